"""Hand-computed values and gradient directions for losses.py (the equations cited in losses.py)."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import losses


def test_sample_margins_use_runner_up():
    z = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    y = torch.tensor([0, 2])
    # 3 - max(1, 2) = 1 ; 1 - max(0, 5) = -4 (not 3 - 1 or summed over classes)
    assert losses.sample_margins(z, y).tolist() == [1.0, -4.0]


def test_margin_mean_var_hand_value():
    z = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    y = torch.tensor([0, 2])
    # margins 1, -4: mean -1.5, population variance 6.25 -> -0.1 * -1.5 + 0.01 * 6.25
    out = losses.margin_mean_var(z, y, alpha=0.1, beta=0.01)
    assert out.dim() == 0
    assert out.item() == pytest.approx(0.2125, abs=1e-6)


def test_margin_term_widens_gap_to_runner_up():
    z = torch.tensor([[2.0, 1.5, -1.0]], requires_grad=True)
    y = torch.tensor([0])
    loss = losses.margin_mean_var(z, y, alpha=0.1, beta=0.01)
    loss.backward()
    g = z.grad[0]
    assert g[0] < 0 and g[1] > 0 and g[2] == 0  # pushes the true logit up and only the runner-up down
    with torch.no_grad():
        stepped = z - 1.0 * z.grad
    assert losses.sample_margins(stepped, y).item() > losses.sample_margins(z.detach(), y).item()


def test_variance_term_pulls_margins_together():
    z = torch.tensor([[4.0, 0.0], [0.0, 1.0]], requires_grad=True)  # margins 4 and -1
    y = torch.tensor([0, 0])
    losses.margin_mean_var(z, y, alpha=0.0, beta=1.0).backward()
    with torch.no_grad():
        m_before = losses.sample_margins(z, y)
        m_after = losses.sample_margins(z - 0.1 * z.grad, y)
    assert m_after.var(unbiased=False) < m_before.var(unbiased=False)


def test_variance_term_vanishes_at_batch_one():
    z = torch.tensor([[7.0, -3.0, 2.0]], requires_grad=True)
    out = losses.margin_mean_var(z, torch.tensor([1]), alpha=0.0, beta=1.0)
    assert out.item() == 0.0
    out.backward()
    assert torch.count_nonzero(z.grad) == 0


def test_moment_matching_hand_value():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # mu = (.5, .5), mu0 = (1, 0): 0.25 + 0.25; Sigma = [[.25, -.25], [-.25, .25]] (divide by C=2), Sigma0 = 0
    assert losses.moment_mean(w, w0).item() == pytest.approx(0.5)
    assert losses.moment_cov(w, w0).item() == pytest.approx(0.25)
    assert losses.text_moment_matching(w, w0).item() == pytest.approx(0.75)


def test_moment_matching_zero_for_identical_and_order_free():
    g = torch.Generator().manual_seed(0)
    w = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    w0 = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    assert losses.text_moment_matching(w, w.clone()).item() == 0.0
    base = losses.text_moment_matching(w, w0).item()
    assert base > 1e-3
    perm = torch.randperm(6, generator=g)
    assert losses.text_moment_matching(w[perm], w0).item() == pytest.approx(base, rel=1e-5)
    assert losses.text_moment_matching(w, w0[perm.flip(0)]).item() == pytest.approx(base, rel=1e-5)


def test_moment_matching_batched_is_mean_over_images():
    g = torch.Generator().manual_seed(1)
    w0 = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    wb = F.normalize(torch.randn(3, 5, 4, generator=g), dim=-1)  # (B, C, D) as in CoCoOp
    expected = sum(losses.text_moment_matching(wb[i], w0) for i in range(3)) / 3
    assert losses.text_moment_matching(wb, w0).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="same C, D"):
        losses.text_moment_matching(wb[:, :4], w0)


def test_moment_matching_gradient_moves_towards_frozen():
    g = torch.Generator().manual_seed(2)
    w0 = F.normalize(torch.randn(4, 3, generator=g), dim=-1)
    w = F.normalize(torch.randn(4, 3, generator=g), dim=-1).requires_grad_()
    loss = losses.text_moment_matching(w, w0)
    loss.backward()
    with torch.no_grad():
        assert losses.text_moment_matching(w - 0.05 * w.grad, w0) < loss


def test_mbls_hand_value():
    z = torch.tensor([[10.0, 0.0, -5.0]])
    # d = (0, 10, 15); relu(d - 2) = (0, 8, 13); mean 7; * 0.1
    assert losses.mbls(z, torch.tensor([0]), margin=2.0, alpha=0.1).item() == pytest.approx(0.7)
    # default margin 10: only the 15 exceeds it by 5 -> 0.1 * 5 / 3
    assert losses.mbls(z, torch.tensor([0])).item() == pytest.approx(0.5 / 3)


def test_zs_norm_logits_hand_value():
    z = torch.tensor([[1.0, 3.0, 5.0], [2.0, 0.0, 1.0]])
    zs = torch.tensor([[10.0, 30.0, 20.0], [-1.0, 1.0, 0.0]])
    out = losses.zs_norm_logits(z, zs)
    assert torch.allclose(out, torch.tensor([[10.0, 20.0, 30.0], [1.0, -1.0, 0.0]]))


def test_zs_norm_calibration_replaces_ce():
    z = torch.tensor([[1.0, 3.0, 5.0], [2.0, 0.0, 1.0]])
    zs = torch.tensor([[10.0, 30.0, 20.0], [-1.0, 1.0, 0.0]])
    y = torch.tensor([1, 0])
    total = F.cross_entropy(z, y) + losses.calibration("zs_norm", z, y, zs_logits=zs)
    expected = F.cross_entropy(torch.tensor([[10.0, 20.0, 30.0], [1.0, -1.0, 0.0]]), y)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_penalty_hand_value():
    z = torch.tensor([[5.0, 0.0, -1.0]])
    zs = torch.tensor([[2.0, 1.0, 0.0]])
    # above max 2: (3, 0, 0) -> mean 1; below min 0: (0, 0, 1) -> mean 1/3; * 10
    assert losses.zs_penalty(z, zs).item() == pytest.approx(40.0 / 3)
    assert losses.zs_penalty(zs, zs).item() == 0.0


def test_mdca_hand_value():
    z = torch.tensor([[math.log(3.0), 0.0]])  # p = (0.75, 0.25)
    # label 1: (|0.75 - 0| + |0.25 - 1|) / 2
    assert losses.mdca(z, torch.tensor([1])).item() == pytest.approx(0.75)
    assert losses.mdca(torch.zeros(2, 2), torch.tensor([0, 1])).item() == pytest.approx(0.0)


def test_calibration_dispatch_values():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 5, generator=g) * 10
    y = torch.tensor([0, 1, 2, 3])
    w = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    w0 = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    zs = torch.randn(4, 5, generator=g) * 10
    kw = dict(text_features=w, zs_text_features=w0, zs_logits=zs, alpha=0.5, beta=0.02, lambda_mom=3.0)
    margin = losses.margin_mean_var(z, y, 0.5, 0.02)
    mom = losses.text_moment_matching(w, w0)
    cases = {
        "none": torch.tensor(0.0),
        "margin": margin,
        "ours": margin + 3.0 * mom,
        "moments": 3.0 * mom,
        "moments_mean": 3.0 * losses.moment_mean(w, w0),
        "moments_cov": 3.0 * losses.moment_cov(w, w0),
        "mbls": losses.mbls(z, y, alpha=0.5),
        "penalty": losses.zs_penalty(z, zs),
        "mdca": losses.mdca(z, y),
    }
    for calib, expected in cases.items():
        out = losses.calibration(calib, z, y, **kw)
        assert out.dim() == 0 and out.dtype == torch.float32, calib
        assert out.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-7), calib
    assert set(cases) | {"zs_norm"} == set(losses.CALIBS)


def test_calibration_errors_name_missing_input():
    z, y = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="not one of"):
        losses.calibration("bogus", z, y)
    for calib in ("ours", "moments", "moments_mean", "moments_cov"):
        with pytest.raises(ValueError, match="text_features"):
            losses.calibration(calib, z, y)
    for calib in ("zs_norm", "penalty"):
        assert losses.needs_zs_logits(calib)
        with pytest.raises(ValueError, match="zs_logits"):
            losses.calibration(calib, z, y)
    assert not losses.needs_zs_logits("ours") and losses.needs_text_features("ours")


def test_half_precision_inputs_computed_in_float32():
    z = torch.tensor([[300.0, 299.9, 0.0]], dtype=torch.float16)  # fp16 step near 300 is 0.25
    out = losses.margin_mean_var(z, torch.tensor([0]), alpha=1.0, beta=0.0)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(-(300.0 - float(torch.tensor(299.9, dtype=torch.float16))))
    assert losses.calibration("mdca", z, torch.tensor([0])).dtype == torch.float32


def test_add_calibration_args_defaults_and_overrides():
    p = losses.add_calibration_args(argparse.ArgumentParser())
    a = p.parse_args([])
    assert (a.calib, a.alpha, a.beta, a.lambda_mom) == ("none", 0.1, 0.01, 5.0)
    a = p.parse_args(["--calib", "ours", "--alpha", "1", "--lambda-mom", "8"])
    assert losses.calibration_kwargs(a) == {"alpha": 1.0, "beta": 0.01, "lambda_mom": 8.0}
    with pytest.raises(SystemExit):
        p.parse_args(["--calib", "bogus"])
