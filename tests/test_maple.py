"""MaPLe end to end on the tiny world, and its deep coupled prompts checked where they enter each layer.

The structural check (test_deep_prompts_enter_exactly_layers_1_to_depth_minus_1) hooks CLIP's own residual
blocks and reads what each one receives: the input of text layer k at positions 1..n_ctx and of vision layer
k at the last n_ctx tokens must be exactly that layer's learned prompt (its vision map for the image side)
for 1 <= k < depth, the shallow prompt at k = 0, and the previous block's output for k >= depth; every other
token passes through untouched. A 4-layer tiny CLIP with depth 3 has layers on both sides of the boundary.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import clip
import data
from clip.model import CLIP, tiny_clip
from conftest import run_script
from test_coop import COMMON, check_results, load_method

NAMES = ["Forest", "Highway_or_Road", "Sea or Lake"]


def _model(depth=3, layers=4, ctx_init="", seed=0):
    maple = load_method("maple")
    torch.manual_seed(seed)
    # Vision width 128, text width 64: the maps must take their sizes from the model.
    clip_model = tiny_clip(context_length=32, vision_layers=layers, vision_width=128, transformer_layers=layers).eval()
    args = maple.parse_args(["--prompt-depth", str(depth), "--ctx-init", ctx_init])
    model = maple.CustomCLIP(args, NAMES, clip_model)
    for name, param in model.named_parameters():  # as main() does: only the prompt learner trains
        param.requires_grad_(name.startswith("prompt_learner."))
    return model, clip_model


def test_maple_smoke_run_and_official_checkpoint(tiny_world, tmp_path):
    root, ckpt, cache = tiny_world
    # zs_norm exercises the one extra forward MaPLe needs: the unprompted image encoder for zero-shot logits.
    proc = run_script("methods/maple.py", *COMMON, "--root", root, "--backbone", ckpt, "--output", tmp_path,
                      "--epochs", "2", "--calib", "zs_norm", cache=cache)
    run_dir = tmp_path / "base2new" / "maple" / "zs_norm" / "eurosat" / "seed1"
    results = check_results(run_dir / "results.json", "maple", "zs_norm")
    assert results["args"]["epochs"] == 2 and results["args"]["prompt_depth"] == 9 and "epoch   2/2" in proc.stdout
    assert "clipped to 2" in proc.stderr  # the tiny CLIP has 2 layers per tower: depth 9 -> 2, one deep prompt
    state = torch.load(run_dir / "prompt.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "ctx": (2, 64), "proj.weight": (64, 64), "proj.bias": (64,), "compound_prompts_text.0": (2, 64),
        "compound_prompt_projections.0.weight": (64, 64), "compound_prompt_projections.0.bias": (64,)}

    # The official code saves the whole model's state dict (frozen CLIP included) under "state_dict", with
    # token buffers; only the prompt learner's tensors are loaded, so evaluation reproduces the run exactly.
    official = {"prompt_learner." + k: v for k, v in state.items()}
    official.update({"prompt_learner.token_prefix": torch.zeros(5, 1, 64), "prompt_learner.token_suffix":
                     torch.zeros(5, 29, 64), "image_encoder.conv1.weight": torch.zeros(64, 3, 8, 8),
                     "text_encoder.positional_embedding": torch.zeros(32, 64), "logit_scale": torch.ones(())})
    torch.save({"state_dict": official, "epoch": 5}, tmp_path / "model.pth.tar-5")
    out = tmp_path / "eval"
    run_script("methods/maple.py", *COMMON, "--root", root, "--backbone", ckpt, "--output", out,
               "--eval-only", "--load", tmp_path / "model.pth.tar-5", cache=cache)
    again = check_results(out / "base2new" / "maple" / "none" / "eurosat" / "seed1" / "results.json", "maple")
    assert again["metrics"] == results["metrics"] and again["temperature"] == results["temperature"]


def _capture(blocks):
    """Forward hooks recording every block's input and output; returns (inputs, outputs, handles)."""
    inputs, outputs = {}, {}

    def hook(i):
        def record(module, args, out):  # returns None: the block's output is left as it is
            inputs[i], outputs[i] = args[0], out
        return record
    return inputs, outputs, [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]


def test_deep_prompts_enter_exactly_layers_1_to_depth_minus_1():
    depth, n = 3, 2
    model, clip_model = _model(depth=depth, layers=4)
    pl = model.prompt_learner
    assert pl.depth == depth and len(pl.compound_prompts_text) == len(pl.compound_prompt_projections) == depth - 1
    assert pl.ctx.shape == pl.compound_prompts_text[0].shape == (n, 64) and pl.proj.weight.shape == (128, 64)
    with torch.no_grad():
        text_in, text_out, h1 = _capture(clip_model.transformer.resblocks)
        vis_in, vis_out, h2 = _capture(clip_model.visual.transformer.resblocks)
        model.text_features()
        model.image_features(torch.randn(2, 3, 32, 32))
        for h in h1 + h2:
            h.remove()
        # Text, (L, C, D): layer 0 sees the shallow context with positions, layers 1..depth-1 their own prompt.
        pos = clip_model.positional_embedding[1:1 + n].unsqueeze(1)  # (n, 1, D)
        torch.testing.assert_close(text_in[0][1:1 + n], (pl.ctx.unsqueeze(1) + pos).expand(-1, 3, -1), rtol=0, atol=0)
        # Vision, (T, B, W): ln_pre of the mapped shallow prompt first, then each layer's mapped deep prompt.
        shallow = clip_model.visual.ln_pre(pl.proj(pl.ctx)).unsqueeze(1).expand(-1, 2, -1)  # (n, B, W)
        torch.testing.assert_close(vis_in[0][-n:], shallow, rtol=0, atol=0)
        for k in range(1, 4):
            if k < depth:
                text_prompt = pl.compound_prompts_text[k - 1].unsqueeze(1).expand(-1, 3, -1)  # (n, C, D)
                vision_prompt = pl.compound_prompt_projections[k - 1](pl.compound_prompts_text[k - 1])
                torch.testing.assert_close(text_in[k][1:1 + n], text_prompt, rtol=0, atol=0)
                torch.testing.assert_close(vis_in[k][-n:], vision_prompt.unsqueeze(1).expand(-1, 2, -1), rtol=0, atol=0)
            else:  # beyond the depth the prompt tokens carry on from the previous layer
                torch.testing.assert_close(text_in[k][1:1 + n], text_out[k - 1][1:1 + n], rtol=0, atol=0)
                torch.testing.assert_close(vis_in[k][-n:], vis_out[k - 1][-n:], rtol=0, atol=0)
            # Every other token always passes through unchanged: SOS and the class-name/EOT suffix, class and patches.
            torch.testing.assert_close(text_in[k][:1], text_out[k - 1][:1], rtol=0, atol=0)
            torch.testing.assert_close(text_in[k][1 + n:], text_out[k - 1][1 + n:], rtol=0, atol=0)
            torch.testing.assert_close(vis_in[k][:-n], vis_out[k - 1][:-n], rtol=0, atol=0)
        assert vis_in[0].shape[0] == 1 + 16 + n  # class token + 4x4 patches + the appended prompts


def test_text_path_without_deep_prompts_is_clip_with_the_template():
    """Depth 1 with the original init: the prompt is "a photo of a {class}." with "a photo" as (learnable)
    context, so MaPLe's text features equal frozen CLIP's for that template exactly, as CoOp's do."""
    model, clip_model = _model(depth=1, ctx_init="a photo of a")
    assert model.prompt_learner.n_ctx == 2 and len(model.prompt_learner.compound_prompts_text) == 0
    tokens = clip.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES], context_length=32)
    with torch.no_grad():
        expected = F.normalize(clip_model.encode_text(clip.trim(tokens)), dim=-1)  # ids cut after EOT, as MaPLe's
        torch.testing.assert_close(model.text_features(), expected, rtol=0, atol=0)
        # The same context with deep prompts changes the text features: the deep prompts are not ignored.
        deep, _ = _model(depth=3, ctx_init="a photo of a")
        assert not torch.allclose(deep.text_features(), expected, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_prompts_change_image_features_and_get_gradients(dtype):
    model, clip_model = _model(depth=3, layers=4)
    clip_model.to(dtype)  # frozen CLIP in the autocast dtype; the prompts stay fp32
    images = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        features = model.image_features(images)  # (B, E)
        with torch.no_grad():
            frozen = F.normalize(clip_model.encode_image(images).float(), dim=-1)
            text = model.text_features()
    assert not torch.allclose(features, frozen, atol=1e-2)
    # Gradients through the image side alone reach every prompt (the text prompts via their vision maps).
    loss = F.cross_entropy(100 * features @ text.t(), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    pl = model.prompt_learner
    for name, param in pl.named_parameters():
        assert param.dtype == torch.float32 and param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("prompt_learner."))


def test_depth_is_clipped_with_a_warning_and_resnet_is_refused():
    with pytest.warns(UserWarning, match="clipped to 2"):
        model, _ = _model(depth=9, layers=2)
    assert model.prompt_learner.depth == 2 and len(model.prompt_learner.compound_prompts_text) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a depth that fits warns nothing
        _model(depth=2, layers=2)
    maple = load_method("maple")
    resnet = CLIP(64, 32, (1, 1, 1, 1), 64, None, 32, 49408, 64, 1, 2)
    with pytest.raises(data.UserError, match="MaPLe prompts the tokens of a ViT"):
        maple.CustomCLIP(maple.parse_args([]), NAMES, resnet)
    with pytest.raises(data.UserError, match="fewer than --n-ctx"):
        args = maple.parse_args(["--ctx-init", "a", "--prompt-depth", "2"])  # one token for two context vectors
        maple.CustomCLIP(args, NAMES, tiny_clip(context_length=32))



def test_ctx_init_with_more_than_four_context_vectors_uses_the_phrase():
    """The official code ignores CTX_INIT when N_CTX > 4 (random vectors instead); here the phrase's token
    embeddings are the context for any --n-ctx, and the tokens beyond --n-ctx stay fixed in the prompt."""
    maple = load_method("maple")
    torch.manual_seed(0)
    clip_model = tiny_clip(context_length=32).eval()
    phrase = "a blurry photo of the small"
    tokens = clip.tokenize(phrase, context_length=32)[0]
    assert int(tokens.argmax()) == 7  # SOS, 6 tokens, EOT
    with torch.no_grad():
        embedding = clip_model.token_embedding(tokens)  # (L, D)
    for n_ctx in (6, 5):
        args = maple.parse_args(["--n-ctx", str(n_ctx), "--ctx-init", phrase, "--prompt-depth", "2"])
        pl = maple.CustomCLIP(args, NAMES, clip_model).prompt_learner
        assert pl.n_ctx == n_ctx and torch.equal(pl.ctx.detach(), embedding[1:1 + n_ctx])
        assert torch.equal(pl.tokenized_prompts[0, :7], tokens[:7])  # "a blurry photo of the small forest."
        # After the context: the rest of the phrase (for n_ctx 5, "small"), then the class name.
        torch.testing.assert_close(pl.token_suffix[:, :6 - n_ctx], embedding[1 + n_ctx:7].expand(3, -1, -1),
                                   rtol=0, atol=0)
