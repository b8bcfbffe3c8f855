"""ProGrad on a tiny CLIP: end-to-end run and reload, the gradient projection, the template initialisation."""
import json

import pytest
import torch
import torch.nn.functional as F

import clip
import data
import eval as evaluation
from conftest import run_script
from test_coop import COMMON, check_results, load_method


@pytest.fixture(scope="module")
def prograd():
    return load_method("prograd")


def test_prograd_smoke_run_and_eval_only_reload(tiny_world, tmp_path):
    root, ckpt, cache = tiny_world
    # zs_norm (needs the batch's zero-shot logits) and --checkpoint-text (two backward passes through
    # recomputed activations) exercise the parts of the step most likely to break.
    proc = run_script("methods/prograd.py", *COMMON, "--root", root, "--backbone", ckpt, "--output", tmp_path / "train",
                      "--epochs", "2", "--calib", "zs_norm", "--checkpoint-text", cache=cache)
    run_dir = tmp_path / "train" / "base2new" / "prograd" / "zs_norm" / "eurosat" / "seed1"
    results = check_results(run_dir / "results.json", "prograd", "zs_norm")
    assert results["args"]["prograd_lambda"] == 1.0 and results["args"]["kd_temperature"] == 1.0
    assert "epoch   2/2" in proc.stdout
    assert 'initial context: 11 zero vectors + "a centered satellite photo of" (5 tokens)' in proc.stdout
    assert "trainable: prompt_learner.ctx (1024 values)" in proc.stdout  # 16 x width 64
    state = torch.load(run_dir / "prompt.pt", weights_only=True)
    assert set(state) == {"ctx"} and state["ctx"].shape == (16, 64)

    run_script("methods/prograd.py", *COMMON, "--root", root, "--backbone", ckpt, "--output", tmp_path / "eval",
               "--calib", "zs_norm", "--eval-only", "--load", run_dir / "prompt.pt", cache=cache)
    reloaded = json.loads((tmp_path / "eval" / "base2new" / "prograd" / "zs_norm" / "eurosat" / "seed1" /
                           "results.json").read_text())
    for split in ("base", "novel"):
        for variant in ("raw", "ts", "dac"):
            for metric in ("acc", "ece", "nll"):
                assert reloaded["metrics"][split][variant][metric] == pytest.approx(
                    results["metrics"][split][variant][metric], abs=1e-6), (split, variant, metric)


def test_projection_by_hand(prograd):
    g_ce, g_kd = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 2.0])  # cos = -1/sqrt(2): they conflict
    # g_ce - (g_ce . g_kd / ||g_kd||^2) g_kd = (1, -1) - (-2 / 4) (0, 2) = (1, 0)
    torch.testing.assert_close(prograd.project_gradient(g_ce, g_kd), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(prograd.project_gradient(g_ce, g_kd, 0.5), torch.tensor([1.0, -0.5]))
    agree = torch.tensor([1.0, 3.0])  # cos > 0 with g_kd: unchanged
    assert torch.equal(prograd.project_gradient(agree, g_kd), agree)
    orthogonal = torch.tensor([5.0, 0.0])  # cos = 0 does not conflict
    assert torch.equal(prograd.project_gradient(orthogonal, g_kd), orthogonal)
    assert torch.equal(prograd.project_gradient(g_ce, torch.zeros(2)), g_ce)  # no teacher signal: unchanged


def test_projection_on_parameter_shaped_gradients(prograd):
    torch.manual_seed(0)
    g_kd = torch.randn(16, 64)
    base = torch.randn(16, 64)
    conflicting = base - (2 + (base * g_kd).sum() / g_kd.pow(2).sum()) * g_kd  # g_ce . g_kd = -2 ||g_kd||^2 < 0
    assert F.cosine_similarity(conflicting.flatten(), g_kd.flatten(), dim=0) < 0
    projected = prograd.project_gradient(conflicting, g_kd)
    assert projected.shape == (16, 64)
    # What is left is orthogonal to g_kd and differs from g_ce only along g_kd.
    assert abs(float((projected * g_kd).sum())) < 1e-3 * float(g_kd.norm() * conflicting.norm())
    removed = conflicting - projected
    torch.testing.assert_close(removed, -2 * g_kd, rtol=1e-4, atol=1e-4)
    agreeing = -conflicting  # g_ce . g_kd > 0
    assert torch.equal(prograd.project_gradient(agreeing, g_kd), agreeing)


def test_template_initialisation(prograd, tiny_world):
    _, ckpt, _ = tiny_world
    clip_model, _ = clip.load(str(ckpt), device="cpu")
    names = ["Abyssinian", "great_pyrenees"]
    args = prograd.parse_args(["--dataset", "oxford_pets"])
    assert args.epochs == 100 and args.n_ctx == 16 and args.lr == 0.002 and args.batch_size == 32
    assert prograd.template_phrase(data.template("oxford_pets", "prograd")) == "a type of pet, a photo of a"
    learner = prograd.PromptLearner(args, names, clip_model)
    phrase = clip.tokenize("a type of pet, a photo of a", context_length=32)[0]
    k = 9  # a type of pet , a photo of a: the comma is its own token
    assert int(phrase.argmax()) - 1 == k
    ctx = learner.ctx.detach()
    assert ctx.shape == (16, 64) and ctx.dtype == torch.float32
    assert torch.equal(ctx[:16 - k], torch.zeros(16 - k, 64))
    assert torch.equal(ctx[16 - k:], clip_model.token_embedding(phrase[1:1 + k]).detach())
    # The class name follows the context directly: SOS, 16 context vectors, then "abyssinian." with its EOT
    # (5 tokens, the longer of the two names), and nothing after it: the prompts are cut after the last EOT.
    assert learner().shape == (2, 22, 64)
    expected = clip_model.token_embedding(clip.tokenize("abyssinian.", context_length=32)[0, 1:6]).detach()
    torch.testing.assert_close(learner()[0, 17:], expected, rtol=0, atol=0)
    with pytest.raises(data.UserError, match="shorter than the 9 tokens"):
        prograd.PromptLearner(prograd.parse_args(["--dataset", "oxford_pets", "--n-ctx", "8"]), names, clip_model)


def test_template_phrase_when_words_follow_the_class(prograd, capsys):
    assert prograd.template_phrase("a texture of {}.") == "a texture of"
    assert prograd.template_phrase("{} texture.") == ""  # every vector starts at zero
    assert "leaves out 'texture.'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no '{}'"):
        prograd.template_phrase("a photo.")


def test_training_step_applies_the_projection_to_each_parameter(prograd, tiny_world, tmp_path, monkeypatch):
    """main() in-process with a spy on project_gradient: every step projects g_ce against g_kd, and what
    the projection returns is what the optimiser steps with."""
    root, ckpt, cache = tiny_world
    monkeypatch.setenv("CP_CACHE", str(cache))
    calls, real = [], prograd.project_gradient

    def spy(g_ce, g_kd, lam):
        out = real(g_ce, g_kd, lam)
        calls.append((g_ce.clone(), g_kd.clone(), lam, out))
        return out

    monkeypatch.setattr(prograd, "project_gradient", spy)
    steps = []
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: steps.append(
        [p.grad.clone() for group in self.param_groups for p in group["params"]]))
    prograd.main([*COMMON, "--root", str(root), "--backbone", str(ckpt), "--output", str(tmp_path), "--epochs", "1",
                  "--prograd-lambda", "0.7"])
    assert len(steps) == 5 and len(calls) == 5  # 20 images / batch 4, one trainable tensor (ctx)
    for (g_ce, g_kd, lam, out), (stepped,) in zip(calls, steps):
        assert lam == 0.7 and g_ce.shape == g_kd.shape == (16, 64)
        assert g_kd.norm() > 0 and not torch.allclose(g_ce, g_kd)  # two different losses, two backward passes
        assert torch.equal(stepped, out)


def test_eval_only_never_builds_the_teacher(prograd, tiny_world, tmp_path, monkeypatch):
    """The teacher's fp32 text features are computed once when training and not at all for --eval-only --load,
    whose metrics are still those of the training run."""
    root, ckpt, cache = tiny_world
    monkeypatch.setenv("CP_CACHE", str(cache))
    fp32_calls = []
    real = evaluation.text_features

    def spy(clip_model, prompts, *args, **kwargs):
        if kwargs.get("fp32"):
            fp32_calls.append(list(prompts))
        return real(clip_model, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluation, "text_features", spy)
    common = [*COMMON, "--root", str(root), "--backbone", str(ckpt)]
    prograd.main([*common, "--output", str(tmp_path / "train"), "--epochs", "1"])
    run_dir = tmp_path / "train" / "base2new" / "prograd" / "none" / "eurosat" / "seed1"
    assert len(fp32_calls) == 1 and fp32_calls[0][0] == data.template("eurosat", "prograd").format("Annual Crop Land")
    fp32_calls.clear()
    prograd.main([*common, "--output", str(tmp_path / "eval"), "--eval-only", "--load", str(run_dir / "prompt.pt")])
    assert fp32_calls == []
    trained = json.loads((run_dir / "results.json").read_text())
    reloaded = json.loads((tmp_path / "eval" / "base2new" / "prograd" / "none" / "eurosat" / "seed1" /
                           "results.json").read_text())
    assert reloaded["metrics"] == trained["metrics"] and reloaded["temperature"] == trained["temperature"]
