"""ProDA end to end on the tiny world, and its mechanisms checked directly: prompt layouts, the Gaussian logit
correction, the all-prompt test classifier and the prompt schedule."""

import pytest
import torch
import torch.nn.functional as F

import clip
import data
from conftest import run_script
from test_coop import COMMON, check_results, load_method

proda = load_method("proda")
NAMES = ["Forest", "Highway_or_Road", "Sea or Lake"]


@pytest.fixture(scope="module")
def tiny_clip(tiny_world):
    clip_model, _ = clip.load(str(tiny_world[1]), device="cpu")
    return clip_model


def test_proda_smoke_run_and_official_checkpoint_layout(tiny_world, tmp_path):
    root, ckpt, cache = tiny_world
    proc = run_script("methods/proda.py", *COMMON, "--root", root, "--backbone", ckpt, "--output", tmp_path,
                      "--epochs", "2", "--calib", "ours", cache=cache)
    run_dir = tmp_path / "base2new" / "proda" / "ours" / "eurosat" / "seed1"
    trained = check_results(run_dir / "results.json", "proda", "ours")
    assert trained["args"]["epochs"] == 2 and trained["args"]["n_prompt"] == 32 and "epoch   2/2" in proc.stdout
    assert "trainable: prompt_learner.ctx (32768 values)" in proc.stdout  # 32 prompts x 16 x width 64
    state = torch.load(run_dir / "prompt.pt", weights_only=True)
    assert set(state) == {"ctx"} and state["ctx"].shape == (32, 16, 64)

    # The public code's checkpoint layout (its token buffers included) evaluates to the same numbers.
    official = {"state_dict": {"ctx": state["ctx"], "token_prefix": torch.zeros(5, 1, 64),
                               "token_suffix": torch.zeros(5, 15, 64), "nc_token_prefix": torch.zeros(1, 1, 64),
                               "nc_token_suffix": torch.zeros(1, 15, 64)}, "epoch": 100}
    torch.save(official, tmp_path / "model.pth.tar-100")
    out = tmp_path / "eval"
    run_script("methods/proda.py", *COMMON, "--root", root, "--backbone", ckpt, "--output", out,
               "--eval-only", "--load", tmp_path / "model.pth.tar-100", cache=cache)
    loaded = check_results(out / "base2new" / "proda" / "none" / "eurosat" / "seed1" / "results.json", "proda")
    for split in ("base", "novel"):
        for key in ("acc", "ece", "nll"):
            assert loaded["metrics"][split]["raw"][key] == pytest.approx(trained["metrics"][split]["raw"][key], abs=1e-6)


def test_front_middle_end_layouts_place_multi_word_class_names(tiny_clip):
    model = proda.CustomCLIP(proda.parse_args([]), NAMES, tiny_clip)
    learner = model.prompt_learner
    assert learner.pos.tolist() == [0] * 8 + [1] * 8 + [2] * 16
    with torch.no_grad():  # marker context: vector i of prompt p is the constant 1000 + 100 p + i
        learner.ctx.copy_((1000 + 100 * torch.arange(32).view(32, 1, 1) + torch.arange(16).view(1, 16, 1))
                          .expand_as(learner.ctx))
    ids = torch.tensor([3, 12, 20])  # one front, one middle, one end prompt
    prompts, tokenized = learner(ids)
    L = tokenized.shape[1]  # cut after the last EOT: "sea or lake." is the longest prompt, 1 + 16 + 5 tokens
    assert L == 22
    prompts = prompts.view(3, 3, L, 64)  # (C, P, L, D)

    # "Highway_or_Road" is tokenised as "highway or road" (3 tokens), not with the underscores (5 tokens).
    name = [7620, 541, 1759]
    assert clip.tokenize("Highway_or_Road", context_length=32)[0].count_nonzero() == 7
    row = tokenized[3 * 1]  # class 1, any prompt: SOS, 16 X, name, ".", EOT
    assert row[:22].tolist() == [49406] + [343] * 16 + name + [269, 49407] and row[22:].eq(0).all()
    emb = tiny_clip.token_embedding(row).detach()  # (L, D)

    def ctx(p, i):
        return torch.full((64,), 1000.0 + 100 * p + i)

    def expected(p, layout):
        sos, words, rest = [emb[0]], [emb[17 + k] for k in range(3)], [emb[k] for k in range(20, L)]
        context = [ctx(p, i) for i in range(16)]
        order = {"front": sos + words + context + rest, "middle": sos + context[:8] + words + context[8:] + rest,
                 "end": sos + context + words + rest}[layout]
        return torch.stack(order)  # (L, D)

    for k, (p, layout) in enumerate(zip(ids.tolist(), ("front", "middle", "end"))):
        torch.testing.assert_close(prompts[1, k], expected(p, layout), rtol=0, atol=0)
    # The end-of-text token stays where tokenized_prompts says, in every layout.
    assert (prompts[1, :, 21] == emb[21]).all() and int(row.argmax()) == 21


def test_gaussian_correction_by_hand():
    # Two prompts (P + 1 = 3), three classes, two dimensions; centred features c: class 0 (+-1, 0), class 1
    # constant (c = 0), class 2 (0, +-2). f = (0.6, 0.8), so f^2 = (0.36, 0.64).
    feats = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]], [[0.3, 2.0], [0.3, -2.0]]])
    f = torch.tensor([[0.6, 0.8], [0.6, 0.8]])
    sigma = proda.gaussian_correction(f, feats, torch.tensor([0, 1]))
    # y = 0: j = 1: 0.36 * (1 + 1) / 3; j = 2: per prompt 0.36 * 1 + 0.64 * 4 = 2.92, twice, / 3.
    # y = 1: j = 0 as above; j = 2: 0.64 * (4 + 4) / 3.
    expected = torch.tensor([[0.0, 0.24, 5.84 / 3], [0.24, 0.0, 5.12 / 3]])
    torch.testing.assert_close(sigma, expected)


def test_gaussian_correction_equals_covariance_form():
    """sigma = R[y,y] + R[j,j] - 2 R[y,j], R = sum_d f_d^2 cov_d, cov over P prompts / (P + 1), as in DAC's code."""
    torch.manual_seed(0)
    B, C, P, E = 3, 5, 4, 8
    feats = F.normalize(torch.randn(C, P, E), dim=-1)
    f = F.normalize(torch.randn(B, E), dim=-1)
    labels = torch.tensor([4, 0, 2])
    c = feats - feats.mean(dim=1, keepdim=True)
    cov = torch.einsum("ipd,kpd->dik", c, c) / (P + 1)  # (E, C, C)
    R = torch.einsum("bd,dik->bik", f ** 2, cov)  # (B, C, C)
    b = torch.arange(B)
    expected = R[b, labels, labels].unsqueeze(1) + torch.diagonal(R, dim1=1, dim2=2) - 2 * R[b, labels]
    sigma = proda.gaussian_correction(f, feats, labels)
    torch.testing.assert_close(sigma, expected, rtol=1e-5, atol=1e-6)
    assert (sigma[b, labels] == 0).all()
    off = torch.ones(B, C, dtype=torch.bool)
    off[b, labels] = False
    assert (sigma[off] > 0).all()


def encode_directly(clip_model, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's text tower on one prompt's embeddings (L, D), written out independently of the method file."""
    x = embeddings.unsqueeze(1) + clip_model.positional_embedding.unsqueeze(1)  # (L, 1, D), sequence first
    x = clip_model.ln_final(clip_model.transformer(x))[:, 0]  # (L, D)
    return x[tokens.argmax()] @ clip_model.text_projection  # (E,)


def test_test_classifier_averages_all_32_prompts(tiny_clip):
    model = proda.CustomCLIP(proda.parse_args([]), NAMES, tiny_clip)
    with torch.no_grad():
        model.prompt_learner.ctx.normal_()  # far apart, so renormalising the mean would show
        classifier = model.text_features(max_sequences=7)  # chunks of 2 prompts
        torch.testing.assert_close(classifier, model.text_features(), rtol=0, atol=1e-6)
        direct = torch.zeros(3, 32, 64)
        for c, name in enumerate(NAMES):
            clean = name.replace("_", " ")
            tokens = clip.tokenize(f"{'X ' * 16}{clean}.", context_length=32)[0]
            n = int(clip.tokenize(clean, context_length=32)[0].count_nonzero()) - 2
            emb = tiny_clip.token_embedding(tokens)  # (L, D)
            sos, words, rest = emb[:1], emb[17:17 + n], emb[17 + n:]
            for p in range(32):
                ctx = model.prompt_learner.ctx[p]
                seq = (torch.cat([sos, words, ctx, rest]) if p < 8 else
                       torch.cat([sos, ctx[:8], words, ctx[8:], rest]) if p < 16 else torch.cat([sos, ctx, words, rest]))
                direct[c, p] = F.normalize(encode_directly(tiny_clip, seq, tokens), dim=-1)
        mean = direct.mean(dim=1)  # (C, E), not renormalised
        torch.testing.assert_close(classifier, mean, rtol=1e-4, atol=1e-5)
        assert (mean.norm(dim=-1) < 0.99).all()
        f = F.normalize(torch.randn(4, 64), dim=-1)
        torch.testing.assert_close(model(f), tiny_clip.logit_scale.exp() * f @ mean.t(), rtol=1e-4, atol=1e-4)


def test_prompt_schedule_and_orthogonality_term(tiny_clip):
    torch.manual_seed(0)
    learner = proda.PromptLearner(proda.parse_args([]), NAMES, tiny_clip)
    first = [learner.next_prompt_ids() for _ in range(8)]  # one permutation: 8 steps of 4 prompts
    assert all(len(ids) == 4 for ids in first)
    assert sorted(torch.cat(first).tolist()) == list(range(32))
    second = torch.cat([learner.next_prompt_ids() for _ in range(8)])
    assert sorted(second.tolist()) == list(range(32)) and not torch.equal(second, torch.cat(first))

    # Class-free prompts: "SOS ctx . EOT" for all 32 prompts.
    prompts, tokens = learner.class_free_prompts()
    assert prompts.shape == (32, 19, 64) and tokens.shape == (32, 19) and int(tokens[0].argmax()) == 18
    torch.testing.assert_close(prompts[:, 1:17], learner.ctx.detach())
    assert proda.mean_abs_cosine(torch.eye(3)) == 0
    assert proda.mean_abs_cosine(torch.tensor([[1.0, 0.0], [-0.6, 0.8], [0.6, 0.8]])) == pytest.approx((0.6 + 0.6 + 0.28) / 3)


def test_bad_prompt_counts_fail_early(tiny_clip):
    with pytest.raises(data.UserError, match="multiple of --prompt-bs"):
        proda.PromptLearner(proda.parse_args(["--n-prompt", "30"]), NAMES, tiny_clip)
