"""PromptSRC end to end on the tiny world, and its mechanisms checked directly on tiny CLIPs: Gaussian prompt
aggregation, deep prompts at the blocks they belong to, the template-ensemble target, official checkpoints."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import clip
import data
import eval as evaluation
from conftest import run_script
from test_coop import COMMON, check_results, load_method

psrc = load_method("promptsrc")
pytestmark = pytest.mark.filterwarnings("ignore:--prompt-depth-.* exceeds")  # the tiny CLIPs have 2 layers
NAMES = ["Forest", "Highway_or_Road", "Sea or Lake"]


def build(*argv, layers=2):
    """(CustomCLIP, clip_model) on a random tiny ViT CLIP with `layers` blocks in each tower, CPU, fp32."""
    torch.manual_seed(0)
    clip_model = clip.tiny_clip(context_length=32, vision_layers=layers, transformer_layers=layers).eval()
    return psrc.CustomCLIP(psrc.parse_args(list(argv)), NAMES, clip_model), clip_model


def test_smoke_run_saves_and_evaluates_the_gaussian_aggregate(tiny_world, tmp_path):
    """3 epochs with GPA mean 2, std 1: the saved prompt must be sum_e w_e * (prompt after epoch e) with the
    weights of gpa_weights, and evaluating that file alone must reproduce the training run's metrics exactly,
    so the aggregate (not the last epoch) is what the run evaluated."""
    root, ckpt, cache = tiny_world
    proc = run_script("methods/promptsrc.py", *COMMON, "--root", root, "--backbone", ckpt, "--output", tmp_path,
                      "--epochs", "3", "--calib", "ours", "--gpa-mean", "2", "--gpa-std", "1",
                      "--save-epoch-prompts", cache=cache)
    run_dir = tmp_path / "base2new" / "promptsrc" / "ours" / "eurosat" / "seed1"
    results = check_results(run_dir / "results.json", "promptsrc", "ours")
    assert results["args"]["epochs"] == 3 and results["args"]["gpa_mean"] == 2 and "epoch   3/3" in proc.stdout
    # The tiny CLIP has 2 layers per tower: depth 9 is clipped to 2 (input prompts + one deep prompt each).
    assert "exceeds the 2 layers of the text encoder" in proc.stderr
    assert ("trainable: prompt_learner.ctx, prompt_learner.VPT, prompt_learner.text_VPT_shallow.1, "
            "prompt_learner.image_VPT_shallow.1 (1024 values)") in proc.stdout  # 4 x 64 each

    saved = torch.load(run_dir / "prompt.pt", weights_only=True)
    assert set(saved) == {"ctx", "VPT", "text_VPT_shallow.1", "image_VPT_shallow.1"}
    epochs = [torch.load(run_dir / "epochs" / f"prompt_epoch{e}.pt", weights_only=True) for e in (1, 2, 3)]
    weights = psrc.gpa_weights(3, 2.0, 1.0)
    for name, value in saved.items():
        assert not torch.equal(epochs[0][name], epochs[2][name])  # the prompts did move during training
        expected = sum(w * snap[name].double() for w, snap in zip(weights, epochs))
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)
        assert not torch.allclose(value, epochs[2][name], rtol=0, atol=1e-6)  # not simply the last epoch

    out = tmp_path / "reload"
    run_script("methods/promptsrc.py", *COMMON, "--root", root, "--backbone", ckpt, "--output", out,
               "--calib", "ours", "--eval-only", "--load", run_dir / "prompt.pt", cache=cache)
    reloaded = check_results(out / "base2new" / "promptsrc" / "ours" / "eurosat" / "seed1" / "results.json",
                             "promptsrc", "ours")
    assert reloaded["metrics"] == results["metrics"] and reloaded["temperature"] == results["temperature"]


def test_gpa_weights_sum_to_one_and_follow_the_gaussian():
    for epochs, mean, std in ((50, 30, 30), (20, 15, 1)):  # DAC's setting and the original one
        w = psrc.gpa_weights(epochs, mean, std)
        assert len(w) == epochs and math.isclose(sum(w), 1.0, abs_tol=1e-12) and min(w) > 0
    w = psrc.gpa_weights(20, 15, 1)
    assert max(range(20), key=w.__getitem__) == 14 and math.isclose(w[13], w[15])  # peak at epoch 15, symmetric
    assert sum(w[12:17]) > 0.99  # std 1: nearly all mass within two epochs of 15
    w = psrc.gpa_weights(50, 30, 30)
    assert w[0] < w[29] and w[49] < w[29] and w[0] > 0.3 * w[29]  # broad: the first epoch still counts
    # By hand for 3 epochs, mean 2, std 1: densities e^-1/2, 1, e^-1/2 (the common factor cancels).
    a = math.exp(-0.5)
    assert psrc.gpa_weights(3, 2, 1) == pytest.approx([a / (1 + 2 * a), 1 / (1 + 2 * a), a / (1 + 2 * a)], abs=1e-15)
    with pytest.raises(data.UserError, match="gpa-std"):
        psrc.gpa_weights(5, 3, 0)


def test_deep_prompts_enter_the_blocks_they_belong_to_and_get_gradients():
    """4 blocks per tower, depth 3: the prompts enter blocks 0..2 and nothing is inserted before block 3.
    The input of block i in 1..2 must hold exactly that block's prompt at the prompt positions (the end of
    the image sequence, positions 1..n_ctx of the text); the sequence length never changes; every prompt
    tensor gets a non-zero gradient; the vision prompts change the image features."""
    model, clip_model = build("--prompt-depth-text", "3", "--prompt-depth-vision", "3", layers=4)
    pl = model.prompt_learner
    assert sorted(pl.image_VPT_shallow) == ["1", "2"] and sorted(pl.text_VPT_shallow) == ["1", "2"]
    seen = {}

    def hook(tower, i):
        return lambda module, inputs: seen.__setitem__((tower, i), inputs[0].detach().clone())

    handles = [b.register_forward_pre_hook(hook(tower, i)) for tower, blocks in
               (("image", clip_model.visual.transformer.resblocks), ("text", clip_model.transformer.resblocks))
               for i, b in enumerate(blocks)]
    images = torch.randn(2, 3, 32, 32)
    feats, text = model.image_features(images), model.text_features()
    for h in handles:
        h.remove()
    n_tokens = 1 + (32 // 8) ** 2 + 4  # class token + 16 patches + 4 vision prompts
    for i in range(4):
        text_len = pl.tokenized_prompts.shape[1]  # prompts cut after their last EOT (clip.trim)
        assert seen["image", i].shape == (n_tokens, 2, 64) and seen["text", i].shape == (text_len, 3, 64)
    for i in (1, 2):
        for b in range(2):
            assert torch.equal(seen["image", i][-4:, b], pl.image_VPT_shallow[str(i)].detach())
        for c in range(3):
            assert torch.equal(seen["text", i][1:5, c], pl.text_VPT_shallow[str(i)].detach())
    assert not torch.equal(seen["image", 3][-4:, 0], seen["image", 2][-4:, 0])  # block 3 gets no new prompt
    # The first layer: the vision prompts pass ln_pre with the patch tokens, the text context sits after SOS.
    x0 = clip_model.visual.ln_pre(torch.cat([clip_model.visual.embed(images), pl.VPT.expand(2, -1, -1)], dim=1))
    torch.testing.assert_close(seen["image", 0], x0.detach().permute(1, 0, 2), rtol=0, atol=0)
    torch.testing.assert_close(seen["text", 0][1:5, 0], (pl.ctx + clip_model.positional_embedding[1:5]).detach())

    frozen = model.zero_shot_image_features(images)
    torch.testing.assert_close(frozen, F.normalize(clip_model.encode_image(images), dim=-1))
    assert (feats - frozen).abs().max() > 1e-3  # the vision prompts change the image features
    (feats @ text.t()).logsumexp(dim=1).sum().backward()
    for name, p in pl.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in clip_model.parameters() if p.requires_grad is False)


def test_text_depth_one_with_the_template_context_is_zero_shot_clip():
    """Depth 1 and the "a photo of a" context: the text path is CLIP's own encoder on the template, exactly."""
    model, clip_model = build("--prompt-depth-text", "1")
    assert model.prompt_learner.n_ctx == 4 and len(model.prompt_learner.text_VPT_shallow) == 0
    with torch.no_grad():
        expected = evaluation.text_features(clip_model, [f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
        torch.testing.assert_close(model.text_features(), expected, rtol=0, atol=0)
        deep, _ = build()  # depth clipped to 2: a random deep prompt replaces the context before block 1
        assert (deep.text_features() - expected).abs().max() > 1e-3


def test_ensemble_target_is_the_mean_of_unnormalised_features():
    _, clip_model = build()
    templates = ["a photo of a {}.", "a drawing of the {}.", "itap of a {}."]
    ens = psrc.ensemble_text_features(clip_model, NAMES, templates)
    with torch.no_grad():
        raw = torch.stack([clip_model.encode_text(clip.tokenize([t.format(n.replace("_", " ")) for n in NAMES],
                                                                context_length=32)) for t in templates])  # (T, C, E)
    torch.testing.assert_close(ens, F.normalize(raw.mean(0), dim=-1), rtol=1e-6, atol=1e-6)
    wrong = F.normalize(F.normalize(raw, dim=-1).mean(0), dim=-1)  # averaging normalised features instead
    assert (ens - wrong).abs().max() > 1e-4 and ens.dtype == torch.float32


def test_official_checkpoint_layout_loads(tmp_path):
    """The official file holds the whole CustomCLIP state dict in fp16; only the prompt tensors are taken."""
    model, _ = build()
    official = {"prompt_learner.ctx": torch.randn(4, 64).half(), "image_encoder.VPT": torch.randn(4, 64).half(),
                "text_encoder.transformer.resblocks.1.VPT_shallow": torch.randn(4, 64).half(),
                "image_encoder.transformer.resblocks.1.VPT_shallow": torch.randn(4, 64).half(),
                "prompt_learner.token_prefix": torch.zeros(5, 1, 64).half(),
                "image_encoder.conv1.weight": torch.zeros(64, 3, 8, 8).half(), "logit_scale": torch.zeros(()),
                "prompt_learner.ZS_image_encoder.class_embedding": torch.zeros(64).half()}
    path = tmp_path / "model.pth.tar-50"
    torch.save({"state_dict": official, "epoch": 50}, path)
    state = psrc.from_official(evaluation.read_checkpoint(path))
    evaluation.load_prompt_state(model.prompt_learner, state, path)
    pl = model.prompt_learner
    assert torch.equal(pl.ctx, official["prompt_learner.ctx"].float()) and pl.ctx.dtype == torch.float32
    assert torch.equal(pl.VPT, official["image_encoder.VPT"].float())
    assert torch.equal(pl.image_VPT_shallow["1"], official["image_encoder.transformer.resblocks.1.VPT_shallow"].float())
    assert torch.equal(pl.text_VPT_shallow["1"], official["text_encoder.transformer.resblocks.1.VPT_shallow"].float())
    ours = pl.state_dict()
    assert psrc.from_official(ours) is ours  # our own files pass through unchanged


def test_resnet_backbone_refused_and_depth_clipped_with_a_warning():
    resnet = clip.model.CLIP(64, 32, (1, 1, 1, 1), 64, None, 32, 49408, 64, 1, 1)
    with pytest.raises(data.UserError, match="ViT"):
        psrc.CustomCLIP(psrc.parse_args([]), NAMES, resnet)
    with pytest.warns(UserWarning, match="--prompt-depth-vision 9 exceeds the 2 layers"):
        model, _ = build()
    assert len(model.prompt_learner.image_VPT_shallow) == 1
    with pytest.raises(data.UserError, match="--prompt-depth-vision: must be a whole number >= 1"):
        build("--prompt-depth-vision", "0")


def test_the_original_template_set_is_the_official_60_of_the_80():
    """data.PROMPTSRC_TEMPLATES: 60 distinct templates of the 80, in the 80's order except that "a photo of a {}."
    leads, as in the official list; together they are exactly the first 60 of the 80."""
    t80, t60 = data.IMAGENET_TEMPLATES, data.PROMPTSRC_TEMPLATES
    assert len(t80) == 80 == len(set(t80)) and len(t60) == 60 == len(set(t60))
    assert set(t60) <= set(t80) and set(t60) == set(t80[:60])
    assert t60[0] == "a photo of a {}." and t80.index(t60[0]) == 39
    positions = [t80.index(t) for t in t60[1:]]
    assert positions == sorted(positions)  # the other 59 keep the 80's order
    # Both ends as the official trainer lists them.
    assert t60[:3] == ["a photo of a {}.", "a bad photo of a {}.", "a photo of many {}."]
    assert t60[-3:] == ["a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}."]
    assert psrc.ENSEMBLES == {"imagenet80": t80, "promptsrc60": t60}


def test_ensemble_templates_option_sets_the_text_target(tiny_world, tmp_path, monkeypatch):
    """--ensemble-templates promptsrc60 makes training average the 60 templates (recorded in results.json); the
    two sets give different ensemble features."""
    _, clip_model = build()
    ens80 = psrc.ensemble_text_features(clip_model, NAMES, psrc.ENSEMBLES["imagenet80"])
    ens60 = psrc.ensemble_text_features(clip_model, NAMES, psrc.ENSEMBLES["promptsrc60"])
    assert ens60.shape == ens80.shape == (3, 64) and (ens60 - ens80).abs().max() > 1e-4
    assert psrc.parse_args([]).ensemble_templates == "imagenet80"

    root, ckpt, cache = tiny_world
    monkeypatch.setenv("CP_CACHE", str(cache))
    used = []
    real = psrc.ensemble_text_features
    monkeypatch.setattr(psrc, "ensemble_text_features",
                        lambda model, names, templates: used.append(templates) or real(model, names, templates))
    psrc.main([*COMMON, "--root", str(root), "--backbone", str(ckpt), "--output", str(tmp_path), "--epochs", "1",
               "--ensemble-templates", "promptsrc60"])
    assert used == [data.PROMPTSRC_TEMPLATES]
    results = json.loads((tmp_path / "base2new" / "promptsrc" / "none" / "eurosat" / "seed1" / "results.json").read_text())
    assert results["complete"] and results["args"]["ensemble_templates"] == "promptsrc60"
