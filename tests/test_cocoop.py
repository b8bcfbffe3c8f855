"""CoCoOp on a tiny CLIP: end-to-end run, batched conditioned prompts against the per-image loop, meta-net training."""
import json

import pytest
import torch
import torch.nn.functional as F

import clip
import losses
from conftest import run_script
from test_coop import COMMON, check_results, load_method

NAMES = ["Forest", "Highway_or_Road", "Sea or Lake", "River", "Pasture Land"]
META_KEYS = {"meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight", "meta_net.linear2.bias"}


@pytest.fixture(scope="module")
def cocoop():
    return load_method("cocoop")


def tiny_model(cocoop, ckpt, *argv):
    """(CustomCLIP with the script's defaults, its frozen CLIP), prompts trainable as in main()."""
    clip_model, _ = clip.load(str(ckpt), device="cpu")
    model = cocoop.CustomCLIP(cocoop.parse_args(list(argv)), NAMES, clip_model)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("prompt_learner."))
    return model, clip_model


def test_cocoop_smoke_run_and_eval_only_reload(tiny_world, tmp_path):
    root, ckpt, cache = tiny_world
    proc = run_script("methods/cocoop.py", *COMMON, "--root", root, "--backbone", ckpt, "--output", tmp_path / "train",
                      "--epochs", "2", "--calib", "ours", cache=cache)
    run_dir = tmp_path / "train" / "base2new" / "cocoop" / "ours" / "eurosat" / "seed1"
    results = check_results(run_dir / "results.json", "cocoop", "ours")
    assert results["args"]["epochs"] == 2 and results["args"]["ctx_init"] == "a photo of a"
    assert "epoch   2/2" in proc.stdout
    # 4 context vectors of width 64 and the meta-net 64 -> 64 // 16 = 4 -> 64: 256 + (256 + 4) + (256 + 64).
    assert ("trainable: prompt_learner.ctx, prompt_learner.meta_net.linear1.weight, prompt_learner.meta_net.linear1.bias, "
            "prompt_learner.meta_net.linear2.weight, prompt_learner.meta_net.linear2.bias (836 values)") in proc.stdout
    state = torch.load(run_dir / "prompt.pt", weights_only=True)
    assert set(state) == {"ctx"} | META_KEYS and state["ctx"].shape == (4, 64)
    assert state["meta_net.linear1.weight"].shape == (4, 64) and state["meta_net.linear2.weight"].shape == (64, 4)

    # Reloading the saved prompt reproduces the metrics, here with chunks of 3 prompts (fewer than the 5 classes,
    # one image per text-encoder pass) where the training run encoded all test images in one pass.
    run_script("methods/cocoop.py", *COMMON, "--root", root, "--backbone", ckpt, "--output", tmp_path / "eval",
               "--eval-only", "--load", run_dir / "prompt.pt", "--chunk-size", "3", cache=cache)
    reloaded = json.loads((tmp_path / "eval" / "base2new" / "cocoop" / "none" / "eurosat" / "seed1" /
                           "results.json").read_text())
    assert reloaded["complete"] is True
    for split in ("base", "novel"):
        for variant in ("raw", "ts", "dac"):
            for metric in ("acc", "ece", "nll"):
                assert reloaded["metrics"][split][variant][metric] == pytest.approx(
                    results["metrics"][split][variant][metric], abs=1e-4), (split, variant, metric)


@pytest.mark.parametrize("chunk", [1024, 4, 1])
def test_batched_prompts_equal_the_per_image_loop(cocoop, tiny_world, chunk):
    """The one-pass (B*C)-prompt encoder gives the logits of the official loop over images, for any chunking."""
    _, ckpt, _ = tiny_world
    torch.manual_seed(0)
    model, clip_model = tiny_model(cocoop, ckpt, "--chunk-size", str(chunk))
    learner = model.prompt_learner
    with torch.no_grad():
        features = model.image_features(torch.randn(3, 3, 32, 32))  # (B=3, E)
        # With a zero meta-net the context is "a photo of a" for every image: zero-shot CLIP with that template.
        for p in learner.meta_net.parameters():
            p.zero_()
        tokens = clip.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES], context_length=32)
        zs = clip_model.logit_scale.exp() * features @ F.normalize(clip_model.encode_text(tokens), dim=-1).t()
        torch.testing.assert_close(model(features), zs, rtol=0, atol=1e-4)
        # Now a meta-net whose bias clearly differs between images.
        for p in learner.meta_net.parameters():
            p.normal_(std=0.5)
        logits = model(features)  # (3, 5)
        looped = []
        for f in features:  # per image: its own context, its own C prompts, its own text features
            ctx = learner.ctx + learner.meta_net(f)  # (n_ctx, D) shifted by the same bias in every token
            prompts = torch.cat([learner.token_prefix, ctx.expand(len(NAMES), -1, -1), learner.token_suffix], dim=1)
            text = F.normalize(model.text_encoder(prompts, learner.tokenized_prompts), dim=-1)  # (C, E)
            looped.append(model.logit_scale.exp() * text @ f)
        looped = torch.stack(looped)  # (3, 5)
    assert (learner.meta_net(features)[0] - learner.meta_net(features)[1]).abs().max() > 0.1  # conditioning matters
    assert not torch.allclose(looped[0], looped[1])
    torch.testing.assert_close(logits, looped, rtol=0, atol=1e-5)


def test_gradient_reaches_meta_net_and_context_only(cocoop, tiny_world):
    _, ckpt, _ = tiny_world
    torch.manual_seed(0)
    model, _ = tiny_model(cocoop, ckpt)
    seen = []
    model.prompt_learner.meta_net.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
    with torch.no_grad():
        features = model.image_features(torch.randn(2, 3, 32, 32) * 3)  # (2, E)
    text = model.text_features(features)  # (2, C, E)
    logits = model.logit_scale.exp() * (features.unsqueeze(1) * text).sum(-1)
    labels = torch.tensor([0, 3])
    zs = F.normalize(torch.randn(len(NAMES), 64), dim=-1)
    (F.cross_entropy(logits, labels) + losses.calibration("ours", logits, labels, text, zs)).backward()
    # The meta-net reads the L2-normalised image feature, as in the official code.
    torch.testing.assert_close(seen[0].norm(dim=-1), torch.ones(2))
    learner = model.prompt_learner
    for name in ["ctx", *sorted(META_KEYS)]:
        grad = learner.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    frozen = [n for n, p in model.named_parameters() if not n.startswith("prompt_learner.")]
    assert frozen and all(model.get_parameter(n).grad is None for n in frozen)
    assert set(learner.state_dict()) == {"ctx"} | META_KEYS  # token buffers are rebuilt, never saved
