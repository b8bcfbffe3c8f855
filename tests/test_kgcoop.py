"""KgCoOp on a tiny CLIP: end-to-end run and reload of an official-layout checkpoint, the knowledge-guided term
at initialisation, and the fp32 frozen features."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import clip
import data
import eval as evaluation
from conftest import run_script
from test_coop import COMMON, check_results, load_method

NAMES = ["Forest", "Highway_or_Road", "Sea or Lake"]


@pytest.fixture(scope="module")
def kgcoop():
    return load_method("kgcoop")


def test_kgcoop_smoke_run_and_official_checkpoint_reload(tiny_world, tmp_path):
    root, ckpt, cache = tiny_world
    proc = run_script("methods/kgcoop.py", *COMMON, "--root", root, "--backbone", ckpt, "--output", tmp_path / "train",
                      "--epochs", "2", "--calib", "ours", "--n-ctx", "16", cache=cache)
    run_dir = tmp_path / "train" / "base2new" / "kgcoop" / "ours" / "eurosat" / "seed1"
    results = check_results(run_dir / "results.json", "kgcoop", "ours")
    assert results["args"]["kg_weight"] == 8.0 and results["args"]["epochs"] == 2
    assert "epoch   2/2" in proc.stdout
    # "a photo of a" is 4 tokens whatever --n-ctx says, and the ignored option is reported.
    assert "--n-ctx 16 is ignored" in proc.stderr
    assert "trainable: prompt_learner.ctx (256 values)" in proc.stdout  # 4 x width 64
    state = torch.load(run_dir / "prompt.pt", weights_only=True)
    assert set(state) == {"ctx"} and state["ctx"].shape == (4, 64)

    # The official layout: the prompt learner under "state_dict", with fixed buffers and the unused
    # bias_vectors / meta_net weights it registers. --eval-only --load must reproduce the metrics exactly.
    official = {"state_dict": {"ctx": state["ctx"], "token_prefix": torch.zeros(5, 1, 64),
                               "token_suffix": torch.zeros(5, 27, 64), "bias_vectors": torch.randn(1, 512),
                               "meta_net.linear1.weight": torch.randn(512, 512),
                               "meta_net.linear1.bias": torch.randn(512)}, "epoch": 200}
    torch.save(official, tmp_path / "model.pth.tar-200")
    proc = run_script("methods/kgcoop.py", *COMMON, "--root", root, "--backbone", ckpt, "--output", tmp_path / "eval",
                      "--calib", "ours", "--eval-only", "--load", tmp_path / "model.pth.tar-200", cache=cache)
    assert "ignoring bias_vectors, meta_net.linear1.bias, meta_net.linear1.weight" in proc.stderr
    reloaded = json.loads((tmp_path / "eval" / "base2new" / "kgcoop" / "ours" / "eurosat" / "seed1" /
                           "results.json").read_text())
    for split in ("base", "novel"):
        for variant in ("raw", "ts", "dac"):
            for metric in ("acc", "ece", "nll"):
                assert reloaded["metrics"][split][variant][metric] == pytest.approx(
                    results["metrics"][split][variant][metric], abs=1e-6), (split, variant, metric)


def test_kg_term_is_zero_at_initialisation_when_the_prompt_is_the_template(kgcoop, tiny_world):
    _, ckpt, _ = tiny_world
    clip_model, _ = clip.load(str(ckpt), device="cpu")
    model = kgcoop.CustomCLIP(kgcoop.parse_args([]), NAMES, clip_model)
    assert model.prompt_learner.n_ctx == 4
    with torch.no_grad():
        tuned = model.text_features()  # (C, E): "a photo of a {class}." through the prompt learner
        assert data.template("caltech101", "kgcoop") == "a photo of a {}."
        w0 = evaluation.text_features(clip_model, data.prompts("caltech101", NAMES, "kgcoop"), fp32=True)
        assert kgcoop.knowledge_guidance(tuned, w0).item() == pytest.approx(0.0, abs=1e-6)
        # EuroSAT's KgCoOp template is "a centered satellite photo of {}.": the prompts differ, so the term is not 0.
        w0_eurosat = evaluation.text_features(clip_model, data.prompts("eurosat", NAMES, "kgcoop"), fp32=True)
        term = kgcoop.knowledge_guidance(tuned, w0_eurosat)
        expected = 1 - sum(float(tuned[c] @ w0_eurosat[c]) for c in range(len(NAMES))) / len(NAMES)  # by hand
        assert term.item() == pytest.approx(expected, abs=1e-6) and term.item() > 1e-3
    # The term trains the context: it backpropagates, and a step down its gradient brings w towards w0.
    tuned = model.text_features()
    term = kgcoop.knowledge_guidance(tuned, w0_eurosat)
    (grad,) = torch.autograd.grad(term, model.prompt_learner.ctx)
    assert grad.abs().sum() > 0
    with torch.no_grad():
        model.prompt_learner.ctx -= 0.01 * grad / grad.norm()
        assert kgcoop.knowledge_guidance(model.text_features(), w0_eurosat) < term


def test_frozen_features_are_computed_in_fp32_from_a_low_precision_clip(kgcoop, tiny_world):
    """The official KgCoOp teacher is fp16; ours runs fp32 arithmetic on the (rounded) frozen weights."""
    _, ckpt, _ = tiny_world
    clip_model, _ = clip.load(str(ckpt), device="cpu")
    low = clip_model.to(torch.bfloat16)  # stands in for fp16 on the GPU
    prompts = data.prompts("caltech101", NAMES, "kgcoop")
    tokens = clip.tokenize(prompts, context_length=low.context_length)
    with torch.no_grad():
        ours = evaluation.text_features(low, prompts, fp32=True)
        reference = F.normalize(copy.deepcopy(low).float().encode_text(tokens), dim=-1)  # the same weights, fp32
        rounded = F.normalize(low.encode_text(tokens).float(), dim=-1)
    assert ours.dtype == torch.float32 and low.dtype == torch.bfloat16  # the frozen model itself is untouched
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert (rounded - reference).abs().max() > 1e-4  # low-precision arithmetic would have been visibly off
