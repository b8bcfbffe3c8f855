"""Training-time calibration terms for prompt tuning of CLIP.

The method of "Towards Calibrating Prompt Tuning of Vision-Language Models" (Sharifdeen et al., CVPR 2026):
a mean-variance margin penalty on the scaled training logits plus text moment matching between the tuned
and the frozen zero-shot class text features, and the training-time baselines it is compared with
(MBLS, ZS-Norm, Penalty, MDCA). Each function cites its paper and equation.

Every function is pure and computes in float32 whatever the input dtype (fp16 logits from a half-precision
encoder are upcast first), so the regularizers never lose precision to fp16. Each method script adds the
selected term with one line::

    loss = F.cross_entropy(logits, y) + losses.calibration(args.calib, logits, y, text_features=w, ...)
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor

CALIBS = ("none", "ours", "margin", "moments", "moments_mean", "moments_cov", "mbls", "zs_norm", "penalty", "mdca")
_NEEDS_TEXT = ("ours", "moments", "moments_mean", "moments_cov")
_NEEDS_ZS_LOGITS = ("zs_norm", "penalty")


def sample_margins(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample margin m_i = z[i, y_i] - max_{j != y_i} z[i, j] (paper, Sec. 3, margin definition).

    The margin is taken to the runner-up class only. Computed in float32, or float64 when given float64
    (eval.py uses it on float64 logits). Gradients flow into both the true and the runner-up logit.
    logits: (B, C) with C >= 2; labels: (B,) int. Returns (B,).
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"sample_margins needs logits of shape (B, C>=2), got {tuple(logits.shape)}")
    z = logits if logits.dtype == torch.float64 else logits.float()
    labels = labels.long().to(z.device)
    true = z.gather(1, labels[:, None]).squeeze(1)  # (B,)
    is_true = F.one_hot(labels, z.shape[1]).bool()  # (B, C)
    runner_up = z.masked_fill(is_true, float("-inf")).amax(dim=1)  # (B,)
    return true - runner_up


def margin_mean_var(logits: Tensor, labels: Tensor, alpha: float = 0.1, beta: float = 0.01) -> Tensor:
    """Mean-variance margin penalty R_margin = -alpha * mean_i(m_i) + beta * Var_i(m_i) (paper, Eq. R_margin).

    logits are the *scaled* (x100) training logits (B, C); m_i from `sample_margins`. Population variance
    over the mini-batch (divide by B), so with B = 1 the variance term is exactly zero. No hinge, no detach.
    """
    m = sample_margins(logits, labels)  # (B,)
    return -alpha * m.mean() + beta * m.var(unbiased=False)


def _moments(w: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (…, D) and covariance (…, D, D) of the rows of w (…, C, D), covariance divided by C."""
    mu = w.mean(dim=-2)  # (..., D)
    centred = w - mu.unsqueeze(-2)  # (..., C, D)
    sigma = centred.transpose(-1, -2) @ centred / w.shape[-2]  # (..., D, D)
    return mu, sigma


def _check_features(tuned: Tensor, frozen: Tensor) -> tuple[Tensor, Tensor]:
    if tuned.dim() not in (2, 3) or frozen.dim() != 2 or tuned.shape[-2:] != frozen.shape:
        raise ValueError(
            "text moment matching needs tuned (C, D) or (B, C, D) and frozen (C, D) text features with the same C, D; "
            f"got {tuple(tuned.shape)} and {tuple(frozen.shape)}")
    return tuned.float(), frozen.float()


def moment_mean(tuned: Tensor, frozen: Tensor) -> Tensor:
    """Mean part of text moment matching, ||mu_W - mu_W0||_2^2 (paper, Eq. R_mom, first term).

    tuned: (C, D) tuned normalised class text features, or (B, C, D) for image-conditioned prompts (CoCoOp),
    in which case the term is averaged over B; frozen: (C, D) zero-shot features of the same classes.
    """
    tuned, frozen = _check_features(tuned, frozen)
    mu, mu0 = tuned.mean(dim=-2), frozen.mean(dim=-2)  # (..., D), (D,)
    return ((mu - mu0) ** 2).sum(dim=-1).mean()


def moment_cov(tuned: Tensor, frozen: Tensor) -> Tensor:
    """Covariance part of text moment matching, ||Sigma_W - Sigma_W0||_F^2 (paper, Eq. R_mom, second term).

    Sigma = (W - mu)^T (W - mu) / C, a D x D matrix. Shapes as in `moment_mean`.
    """
    tuned, frozen = _check_features(tuned, frozen)
    _, sigma = _moments(tuned)
    _, sigma0 = _moments(frozen)
    return ((sigma - sigma0) ** 2).sum(dim=(-2, -1)).mean()


def text_moment_matching(tuned: Tensor, frozen: Tensor) -> Tensor:
    """Text moment matching R_mom = ||mu_W - mu_W0||^2 + ||Sigma_W - Sigma_W0||_F^2 (paper, Eq. R_mom).

    Both terms squared and summed, not averaged over elements. Invariant to the order of the class rows.
    Shapes as in `moment_mean`.
    """
    return moment_mean(tuned, frozen) + moment_cov(tuned, frozen)


def mbls(logits: Tensor, labels: Tensor, margin: float = 10.0, alpha: float = 0.1) -> Tensor:
    """Extra term of margin-based label smoothing (Liu et al., CVPR 2022, Eq. 7): alpha * mean relu(d - margin).

    d_ic = max_k z_ik - z_ic, averaged over all B * C entries. `labels` is unused (kept for a uniform
    signature); the CE part is the method's own.
    """
    z = logits.float()
    d = z.amax(dim=1, keepdim=True) - z  # (B, C)
    return alpha * F.relu(d - margin).mean()


def zs_norm_logits(logits: Tensor, zs_logits: Tensor) -> Tensor:
    """ZS-Norm logits (Murugesan et al., ECCV 2024): per sample, min-max normalise the tuned logits to
    [0, 1], then rescale to the [min, max] range of the zero-shot logits of the same image.

    logits, zs_logits: (B, C) scaled logits; the zero-shot logits are a frozen target and are detached.
    A row of constant tuned logits maps to the zero-shot minimum (guarded against division by zero).
    """
    z, zs = logits.float(), zs_logits.float().detach()
    if z.shape != zs.shape:
        raise ValueError(f"zs_norm_logits: logits {tuple(z.shape)} and zs_logits {tuple(zs.shape)} differ")
    lo, hi = z.amin(dim=1, keepdim=True), z.amax(dim=1, keepdim=True)  # (B, 1)
    unit = (z - lo) / (hi - lo).clamp_min(torch.finfo(torch.float32).eps)  # (B, C) in [0, 1]
    zlo, zhi = zs.amin(dim=1, keepdim=True), zs.amax(dim=1, keepdim=True)
    return zlo + unit * (zhi - zlo)


def zs_penalty(logits: Tensor, zs_logits: Tensor, weight: float = 10.0) -> Tensor:
    """Penalty of Murugesan et al. (ECCV 2024): weight * (mean relu(z_ic - max_c' zs_ic') +
    mean relu(min_c' zs_ic' - z_ic)), means over all B * C entries; penalises tuned logits outside the
    per-sample zero-shot range. zs_logits are detached.
    """
    z, zs = logits.float(), zs_logits.float().detach()
    if z.shape != zs.shape:
        raise ValueError(f"zs_penalty: logits {tuple(z.shape)} and zs_logits {tuple(zs.shape)} differ")
    above = F.relu(z - zs.amax(dim=1, keepdim=True)).mean()
    below = F.relu(zs.amin(dim=1, keepdim=True) - z).mean()
    return weight * (above + below)


def mdca(logits: Tensor, labels: Tensor) -> Tensor:
    """Multi-class difference in confidence and accuracy (Hebbalaguppe et al., CVPR 2022, Eq. 3):
    (1/C) * sum_c |mean_i p_ic - mean_i 1[y_i = c]| on softmax probabilities, weight 1.
    """
    z = logits.float()
    p = z.softmax(dim=1)  # (B, C)
    onehot = F.one_hot(labels.long().to(z.device), z.shape[1]).float()  # (B, C)
    return (p.mean(dim=0) - onehot.mean(dim=0)).abs().mean()


def needs_zs_logits(calib: str) -> bool:
    """Whether `calibration(calib, ...)` needs the frozen zero-shot logits of the batch (zs_norm, penalty)."""
    return calib in _NEEDS_ZS_LOGITS


def needs_text_features(calib: str) -> bool:
    """Whether `calibration(calib, ...)` needs tuned and zero-shot text features (ours and moments*)."""
    return calib in _NEEDS_TEXT


def calibration(calib: str, logits: Tensor, labels: Tensor, text_features: Tensor | None = None,
                zs_text_features: Tensor | None = None, zs_logits: Tensor | None = None,
                alpha: float = 0.1, beta: float = 0.01, lambda_mom: float = 5.0) -> Tensor:
    """The term a method adds to its own plain cross-entropy for `--calib calib` (0-dim float32 tensor).

    - none: 0.  ours: R_margin + lambda_mom * R_mom (paper, total loss).  margin: R_margin only.
    - moments / moments_mean / moments_cov: lambda_mom * (full / mean-only / covariance-only) R_mom.
    - mbls: the MBLS term with weight `alpha` (MBLS's own default is also 0.1), margin 10.
    - penalty: the ZS penalty (weight 10).  mdca: the MDCA term (weight 1).
    - zs_norm: CE(zs_norm_logits) - CE(logits), so CE(logits) + this = ZS-Norm's loss, which replaces CE.
    logits: scaled (B, C); text_features: tuned normalised (C, D) or (B, C, D); zs_text_features: (C, D).
    """
    if calib not in CALIBS:
        raise ValueError(f"--calib {calib!r} is not one of {', '.join(CALIBS)}")
    if calib in _NEEDS_TEXT and (text_features is None or zs_text_features is None):
        raise ValueError(f"--calib {calib} needs text_features and zs_text_features (tuned and zero-shot class "
                         "text features); the method passed None")
    if calib in _NEEDS_ZS_LOGITS and zs_logits is None:
        raise ValueError(f"--calib {calib} needs zs_logits (frozen zero-shot logits of the batch); the method passed None")
    if calib == "none":
        return torch.zeros((), dtype=torch.float32, device=logits.device)
    if calib == "margin":
        return margin_mean_var(logits, labels, alpha, beta)
    if calib == "ours":
        return margin_mean_var(logits, labels, alpha, beta) + lambda_mom * text_moment_matching(text_features, zs_text_features)
    if calib == "moments":
        return lambda_mom * text_moment_matching(text_features, zs_text_features)
    if calib == "moments_mean":
        return lambda_mom * moment_mean(text_features, zs_text_features)
    if calib == "moments_cov":
        return lambda_mom * moment_cov(text_features, zs_text_features)
    if calib == "mbls":
        return mbls(logits, labels, alpha=alpha)
    if calib == "penalty":
        return zs_penalty(logits, zs_logits)
    if calib == "mdca":
        return mdca(logits, labels)
    # zs_norm: swap the method's CE for CE of the ZS-normalised logits.
    labels = labels.long().to(logits.device)
    return F.cross_entropy(zs_norm_logits(logits, zs_logits), labels) - F.cross_entropy(logits.float(), labels)


def add_calibration_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --calib, --alpha, --beta, --lambda-mom (dest lambda_mom) to a method's argument parser."""
    g = parser.add_argument_group("calibration (losses.py; README \"Methods\")")
    g.add_argument("--calib", default="none", choices=CALIBS, help="training-time calibration term (default: none)")
    g.add_argument("--alpha", type=float, default=0.1, help="weight of the mean margin (ours/margin); MBLS weight (mbls)")
    g.add_argument("--beta", type=float, default=0.01, help="weight of the margin variance (ours/margin)")
    g.add_argument("--lambda-mom", dest="lambda_mom", type=float, default=5.0,
                   help="weight of text moment matching (ours/moments*)")
    return parser


def calibration_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of `calibration` taken from parsed args: alpha, beta, lambda_mom."""
    return {"alpha": args.alpha, "beta": args.beta, "lambda_mom": args.lambda_mom}
