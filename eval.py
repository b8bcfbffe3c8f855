"""Evaluation: calibration metrics, post-hoc calibrators, result files and summary tables.

The metrics follow the calibration literature (ECE with 10 equal-width bins on (0, 1] is the headline number);
the post-hoc calibrators are temperature scaling (Guo et al., ICML 2017) and DAC (Wang et al., ICML 2024);
docs/protocol.md defines each in words. Every method script evaluates its logits once (`predict`), then
reports raw, TS and DAC variants of the same logits (`evaluate_split`) and writes `results.json` atomically
(`write_results`). `python eval.py summarize OUTPUT_DIR` turns a tree of result files into the paper-shaped
tables; with `--paper` it also sets base-to-novel runs beside the paper's published numbers
(published/tcpt_tables.csv, `paper_report`). Plots use matplotlib's object API with the Agg canvas, so no
display and no global backend switch are needed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import fcntl
import io
import json
import os
import pickle
import subprocess
import sys
import types
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

import data
import losses
from data import UserError

VARIANTS = ("raw", "ts", "dac")


# ----------------------------------------------------------------------------------------------- metrics
def _probs(logits) -> torch.Tensor:
    """Softmax in float64 (never fp16): (N, C)."""
    return torch.as_tensor(logits).detach().cpu().double().softmax(dim=1)


def _bin_stats(conf: np.ndarray, correct: np.ndarray, n_bins: int):
    """Per-bin count, accuracy and mean confidence for equal-width bins; sample in bin j iff lo_j < conf <= hi_j."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)  # conf = 1.0 -> last bin
    counts = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty bins give NaN and are never used
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / counts
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / counts
    return counts, acc, mean_conf


def calibration_errors(conf: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> tuple[float, float, float]:
    """(ECE, MCE, ACE) as fractions. ECE: sum_j n_j/N |acc_j - conf_j| over equal-width bins; MCE: the
    textbook max_j |acc_j - conf_j| over non-empty bins; ACE: the ECE sum over n_bins equal-mass bins
    (samples sorted by confidence, split into nearly equal consecutive chunks)."""
    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, np.float64)
    n = len(conf)
    counts, acc, mean_conf = _bin_stats(conf, correct, n_bins)
    full = counts > 0
    gaps = np.abs(acc[full] - mean_conf[full])
    ece, mce = float(np.sum(counts[full] / n * gaps)), float(gaps.max())
    order = np.argsort(conf, kind="stable")
    ace = sum(len(c) / n * abs(correct[c].mean() - conf[c].mean()) for c in np.array_split(order, n_bins) if len(c))
    return ece, mce, float(ace)


def compute_metrics(logits, labels, n_bins: int = 10) -> dict:
    """Metrics of one set of logits (N, C): acc, ece, mce, ace, macro_f1, confidence in percent; nll, brier
    (mean over samples of sum_c (p_c - y_c)^2); margin_mean, margin_std (population) of the margins of the
    given (scaled) logits, the paper's margin; n. Macro-F1 averages over classes that occur in the labels or
    the predictions (classes with neither have no defined F1)."""
    z = torch.as_tensor(logits).detach().cpu().double()
    y = torch.as_tensor(labels).detach().cpu().long()
    if z.dim() != 2 or len(z) == 0 or len(z) != len(y):
        raise ValueError(f"compute_metrics needs logits (N>0, C) and N labels, got {tuple(z.shape)} and {tuple(y.shape)}")
    p = z.softmax(dim=1)
    conf, pred = p.max(dim=1)
    correct = (pred == y).double()
    ece, mce, ace = calibration_errors(conf.numpy(), correct.numpy(), n_bins)
    onehot = torch.nn.functional.one_hot(y, z.shape[1]).double()
    nll = -z.log_softmax(dim=1).gather(1, y[:, None]).mean()
    y_np, pred_np, c = y.numpy(), pred.numpy(), z.shape[1]
    tp = np.bincount(y_np[pred_np == y_np], minlength=c)
    denom = np.bincount(pred_np, minlength=c) + np.bincount(y_np, minlength=c)  # 2TP + FP + FN
    m = losses.sample_margins(z, y)  # float64 kept
    return {"acc": 100 * correct.mean().item(), "ece": 100 * ece, "mce": 100 * mce, "ace": 100 * ace,
            "nll": nll.item(), "brier": ((p - onehot) ** 2).sum(dim=1).mean().item(),
            "macro_f1": 100 * float(np.mean(2 * tp[denom > 0] / denom[denom > 0])),
            "confidence": 100 * conf.mean().item(), "margin_mean": m.mean().item(),
            "margin_std": m.std(unbiased=False).item(), "n": len(y)}


# -------------------------------------------------------------------------------------- post-hoc calibrators
def fit_temperature(logits, labels, t_min: float = 0.01, t_max: float = 100.0, iters: int = 100) -> float:
    """Temperature T minimising the NLL of softmax(logits / T) exactly (calibrated logits = logits / T).

    Fitted by bisection in float64 on the derivative of the NLL in the inverse temperature b = 1/T, searched
    in log b over [1/t_max, 1/t_min]: NLL(b) = mean(logsumexp(b z) - b z_y) is convex in b, so its derivative
    mean(E_p[z] - z_y) is monotone and bisection finds the global optimum (clipped to the bounds when it lies
    outside, e.g. for separable data). DAC's public code instead runs 20 epochs of SGD on log scale.
    """
    z = torch.as_tensor(logits).detach().cpu().double()
    y = torch.as_tensor(labels).detach().cpu().long()

    def slope(log_b: float) -> float:
        zb = z * np.exp(log_b)
        return ((zb.softmax(dim=1) * z).sum(dim=1) - z.gather(1, y[:, None]).squeeze(1)).mean().item()

    lo, hi = np.log(1 / t_max), np.log(1 / t_min)
    if slope(hi) <= 0:
        return t_min
    if slope(lo) >= 0:
        return t_max
    for _ in range(iters):
        if hi - lo < 1e-12:  # relative precision of T, far below any effect on the metrics
            break
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    return float(np.exp(-0.5 * (lo + hi)))


class Temperature(float):
    """A fitted temperature (a float) that also carries `fit_n`, the number of validation images it was fitted
    on, so `write_results` can record both ("temperature", "ts_fit_n") without another return value."""

    fit_n: int | None

    def __new__(cls, value: float, fit_n: int | None = None):
        self = super().__new__(cls, value)
        self.fit_n = fit_n
        return self


def _knn_distances(test: torch.Tensor, base: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest Euclidean distances from each normalised test row to the normalised base rows: (C_test, k)."""
    a = torch.nn.functional.normalize(test.detach().cpu().double(), dim=-1)
    b = torch.nn.functional.normalize(base.detach().cpu().double(), dim=-1)
    d = (2 - 2 * a @ b.T).clamp_min(0).sqrt()  # (C_test, C_base); |a - b|^2 = 2 - 2 cos for unit vectors
    return d.topk(min(k, b.shape[0]), dim=1, largest=False).values


def dac_factors(tuned_test, zs_test, tuned_base, zs_base, k: int = 5, base_threshold: float = 0.05) -> torch.Tensor:
    """DAC factors (Wang et al., ICML 2024), one per test class: (C_test,) float32.

    score(c) = exp(-mean of the K smallest distances to the base-class text features), with the tuned and
    with the zero-shot features; factor = score_tuned / score_zs, exactly 1.0 when the nearest tuned distance
    is below `base_threshold` (a base class). K is clipped to the number of base classes.
    """
    d_tuned = _knn_distances(tuned_test, tuned_base, k)
    d_zs = _knn_distances(zs_test, zs_base, k)
    factors = torch.exp(d_zs.mean(dim=1) - d_tuned.mean(dim=1))  # = exp(-d_tuned) / exp(-d_zs)
    factors[d_tuned[:, 0] < base_threshold] = 1.0
    return factors.float()


def apply_dac(logits: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Multiply each sample's whole logit row by the (positive) factor of its predicted class; the argmax,
    hence accuracy, is unchanged."""
    return logits * factors.to(logits)[logits.argmax(dim=1)][:, None]


# ------------------------------------------------------------------------------------------------ running
@torch.no_grad()
def predict(fn: Callable, loader: Iterable, device, desc: str = "predict"):
    """Run `fn(images)` over the loader once; return (outputs, labels) on the CPU, outputs float32.

    `fn` may return a tensor or a tuple of tensors (e.g. logits and features); the result mirrors it.
    Outputs stay on the device until the end and are moved in one transfer, so no per-batch host sync.
    """
    outs, labels, single = [], [], True
    for images, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        out = fn(images.to(device, non_blocking=True))
        single = isinstance(out, torch.Tensor)
        outs.append(tuple(o.float() for o in ((out,) if single else out)))
        labels.append(y)
    if not outs:
        raise ValueError(f"predict ({desc}): the loader yielded no batches")
    cat = tuple(torch.cat(parts).cpu() for parts in zip(*outs))  # each (N, ...)
    return (cat[0] if single else cat), torch.cat(labels).long().cpu()


def evaluate_split(logits, labels, temperature: float | None, dac: torch.Tensor | None, out_dir=None,
                   name: str = "test", n_bins: int = 10) -> dict:
    """Metrics of the raw logits, of logits / temperature ("ts") and of DAC-scaled raw logits ("dac"), and
    reliability diagrams `reliability_<name>_<variant>.png` (20 bins) in out_dir (skipped when None).
    A variant whose calibrator is None is left out of the result."""
    logits = torch.as_tensor(logits).float()
    variants = {"raw": logits}
    if temperature is not None:
        variants["ts"] = logits / temperature
    if dac is not None:
        variants["dac"] = apply_dac(logits, dac)
    result = {}
    for variant, z in variants.items():
        result[variant] = compute_metrics(z, labels, n_bins)
        if out_dir is not None:
            reliability_diagram(z, labels, Path(out_dir) / f"reliability_{name}_{variant}.png",
                                title=f"{name}, {variant}")
    return result


def reliability_diagram(logits, labels, path, n_bins: int = 20, title: str = "") -> None:
    """Per-bin accuracy bars against the diagonal, the gap to the bin's mean confidence shaded; the table ECE
    (10 bins) is printed on the plot."""
    p = _probs(logits)
    conf, pred = p.max(dim=1)
    correct = (pred == torch.as_tensor(labels).long()).double().numpy()
    conf = conf.numpy()
    counts, acc, mean_conf = _bin_stats(conf, correct, n_bins)
    ece = 100 * calibration_errors(conf, correct, 10)[0]
    full, width = counts > 0, 1.0 / n_bins
    centres = (np.arange(n_bins) + 0.5) * width
    fig = Figure(figsize=(4, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(centres[full], acc[full], width, color="tab:blue", edgecolor="black", label="accuracy")
    ax.bar(centres[full], mean_conf[full] - acc[full], width, bottom=acc[full], color="tab:red", alpha=0.3,
           edgecolor="tab:red", hatch="//", label="gap")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.text(0.04, 0.93, f"ECE = {ece:.2f}% (10 bins)", transform=ax.transAxes,
            bbox={"facecolor": "white", "alpha": 0.8})
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.9), fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


# ------------------------------------------------------------------------------------------- result files
def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, (Path, os.PathLike)):
        return os.fspath(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, argparse.Namespace):
        return vars(o)
    raise TypeError(f"results: cannot write a {type(o).__name__} to JSON")


def write_json_atomic(path, obj) -> None:
    """JSON through `data.write_atomic`: a killed or failed write never leaves a partial file under `path`."""
    data.write_atomic(path, json.dumps(obj, indent=2, default=_jsonable).encode())


def code_version() -> dict:
    """{"commit": HEAD of the repository holding eval.py, "dirty": tracked files modified}; None where git or
    the repository is unavailable."""
    here = Path(__file__).resolve().parent

    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(here), *cmd], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return {"commit": commit, "dirty": dirty}


def write_results(out_dir, *, method: str, args, metrics: dict, temperature: float | None, timings: dict,
                  extra: dict | None = None) -> Path:
    """Write `out_dir/results.json` atomically with the run's identity (from args), all arguments, the code
    version, timings, the temperature and "ts_fit_n", the number of validation images it was fitted on (the
    `fit_n` of a `Temperature`, else None), metrics ({split: {variant: compute_metrics dict}}) and
    "complete": true.
    demo = args.demo, or a demo dataset (key "demo_*"); `extra` (e.g. {"demo": True}) overrides any field."""
    a = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    dataset = a.get("dataset")
    record = {"method": method, "dataset": dataset, "protocol": a.get("protocol"), "seed": a.get("seed"),
              "shots": a.get("shots"), "calib": a.get("calib", "none"), "backbone": a.get("backbone"),
              "demo": bool(a.get("demo")) or str(dataset).startswith("demo_"), "args": a,
              "code": code_version(), "timings": timings, "temperature": temperature,
              "ts_fit_n": getattr(temperature, "fit_n", None), "metrics": metrics,
              "written_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    record.update(extra or {})
    record["complete"] = True
    path = Path(out_dir) / "results.json"
    write_json_atomic(path, record)
    release_runs()  # the run is finished: its folder's lock goes
    return path


# ------------------------------------------------------------------------------------- run plumbing
class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: a command-line error is a UserError (one `error:` line, exit status 2), and --help
    states each default once: options whose help text already says its default get no "(default: ...)"."""

    class Formatter(argparse.ArgumentDefaultsHelpFormatter):
        """Appends "(default: X)" unless the help text already says "default" or there is no default worth
        stating (None, a flag's False, ""); a default of 0 is stated."""

        def _get_help_string(self, action):
            text = action.help or ""
            unstated = action.default is None or action.default is False or action.default == "" \
                or action.default is argparse.SUPPRESS
            if "default" in text or unstated:
                return text
            return super()._get_help_string(action)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=self.Formatter, **kwargs)

    def error(self, message: str):
        error = UserError(f"{message} (command line of {self.prog}); see {self.prog} --help")
        error.status = 2  # argparse's status for a usage error
        raise error


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: a whole number >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}")
        return value
    return parse


@contextlib.contextmanager
def user_errors():
    """Every script runs main() inside this. A UserError ends the process with one line `error: ...` on stderr
    and its status, no traceback; any other exception is a bug and keeps its traceback. Either way, a run
    folder this process claimed and left without results is removed if nothing else is in it."""
    try:
        yield
    except UserError as e:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line, always
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(e.status) from None
    finally:
        release_runs()


def pick_device(name: str = "auto", precision: str = "auto") -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None for plain fp32). auto picks cuda, then mps, then cpu; auto precision is
    fp16 on CUDA (the frozen encoders' dtype in the official code) and fp32 elsewhere."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise UserError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s) on this machine; "
                        f"use --device cpu (or auto), or check CUDA_VISIBLE_DEVICES")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: this machine (or this torch build) has no MPS device; use --device cpu")
    if device.type not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device {name}: only cpu, cuda and mps are supported")
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return device, {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def load_backbone(name: str, device: torch.device, amp_dtype: torch.dtype | None):
    """clip.load(name) held in the autocast dtype (fp32 without autocast); a name that is neither a CLIP model
    nor a readable CLIP checkpoint is a UserError naming it."""
    import clip  # local import: eval.py's metrics and summaries need no model code

    if name not in clip.available_models() and not os.path.isfile(name):
        raise UserError(f"--backbone {name!r} is neither a CLIP model ({', '.join(clip.available_models())}) nor a "
                        f"file; give one of those names or the path of a CLIP checkpoint")
    try:
        clip_model, _ = clip.load(name, device=device)
    except (clip.CheckpointError, OSError) as e:
        raise UserError(f"--backbone: {e}; give a CLIP model name or an official CLIP checkpoint file") from None
    return clip_model.to(amp_dtype or torch.float32)


class RunBusy(UserError):
    """The run folder is locked by another process that is training the same run."""

    status = 75  # EX_TEMPFAIL: run.sh reports the run as "being run elsewhere", not as failed


_claimed: dict[Path, tuple[int, Path]] = {}  # run folder -> (descriptor holding its lock, output root)


def _lock_held_by_parent(lock: Path) -> bool:
    """run.sh locks the folder itself before starting the script and passes the descriptor as $RUN_LOCK_FD."""
    fd = os.environ.get("RUN_LOCK_FD", "")
    try:
        held, here = os.fstat(int(fd)), os.stat(lock)
    except (ValueError, OSError):
        return False
    return (held.st_dev, held.st_ino) == (here.st_dev, here.st_ino)


def claim_run(path: Path, root: Path | None = None) -> None:
    """Lock the run folder `path` (an exclusive flock on path/.lock) for the life of this process, or raise
    RunBusy when another process holds it. The lock goes with the process, even after kill -9. `root`: the
    output folder above it, down to which `release_runs` removes folders left empty."""
    lock = path / ".lock"
    if path in _claimed or _lock_held_by_parent(lock):
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~data._umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunBusy(f"the run folder {path} is locked by another process that is training this run; wait "
                          f"for it to finish, or write elsewhere with --output") from None
        try:  # the last holder may have removed the file between our open and our lock: then lock the new one
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    _claimed[path] = (fd, root or path)


def release_runs() -> None:
    """Unlock the run folders this process claimed; one that holds nothing but its lock file is removed, so a
    run that failed before writing anything leaves no folder that reads as an unfinished run."""
    for path, (fd, root) in list(_claimed.items()):
        with contextlib.suppress(OSError):
            if [p.name for p in path.iterdir()] == [".lock"]:
                (path / ".lock").unlink()
                path.rmdir()
                for parent in path.parents:  # PROTOCOL/METHOD/CALIB/DATASET folders made for it, if now empty
                    if parent == root or root not in parent.parents:
                        break
                    parent.rmdir()  # fails (and stops) at the first folder that holds something else
        os.close(fd)
        del _claimed[path]


def run_dir(args, method: str) -> Path:
    """OUTPUT/PROTOCOL/METHOD/CALIB/DATASET/seedN/, created and locked for this process (`claim_run`); the
    results.json of an earlier run and temporary files of a killed write are removed first, so a run that dies
    midway never leaves a finished-looking file behind."""
    root = Path(args.output)
    path = root / args.protocol / method / args.calib / args.dataset / f"seed{args.seed}"
    existing = next(p for p in (path, *path.parents) if p.exists())  # checked first, so nothing is created
    why = "it is not a folder" if not existing.is_dir() else \
        "Permission denied" if not os.access(existing, os.W_OK | os.X_OK) else None
    for attempt in range(3):  # another process's release_runs may remove an empty parent meanwhile: retry
        try:
            if why:
                raise NotADirectoryError(why)
            path.mkdir(parents=True, exist_ok=True)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
        except OSError as e:
            raise UserError(f"cannot write the run folder {path} ({existing}: {e.strerror or e}); choose a "
                            f"writable folder with --output") from None
    claim_run(path, root)
    (path / "results.json").unlink(missing_ok=True)
    for stale in path.glob(".*.tmp"):  # a write killed between its temporary file and the rename
        stale.unlink(missing_ok=True)
    return path


@torch.no_grad()
def text_features(clip_model, prompts: list[str], batch_size: int = 500, fp32: bool = False,
                  normalize: bool = True) -> torch.Tensor:
    """Frozen CLIP text features of hand-written prompts, float32, on the model's device: (C, E), L2-normalised
    unless normalize=False. fp32=True computes them with a temporary fp32 copy of the model when it is held in
    fp16/bf16 (for targets a method is pulled towards; the official code's fp16 teachers are a known defect)."""
    import clip  # local import: eval.py's metrics and summaries need no model code

    if fp32 and clip_model.dtype != torch.float32:
        clip_model = copy.deepcopy(clip_model).float()  # once per call; the features are computed once per run
    device = clip_model.positional_embedding.device
    tokens = clip.tokenize(prompts, context_length=clip_model.context_length).to(device)  # (C, L)
    with torch.autocast(device.type, enabled=False):  # the model's own dtype decides the precision
        # Each chunk is cut after its last end-of-text token (clip.trim): same features, a fraction of the work.
        feats = torch.cat([clip_model.encode_text(clip.trim(chunk)).float()
                           for chunk in tokens.split(batch_size)])  # (C, E)
    return torch.nn.functional.normalize(feats, dim=-1) if normalize else feats


def evaluate_protocol(train, targets: dict, *, encode_fn: Callable, logits_fn: Callable, tuned_text_fn: Callable,
                      clip_model, dataset: str, n_px: int, device, amp_dtype, out_dir, num_workers=None,
                      val: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[dict, float]:
    """Evaluate a trained model on every target split: ({target: {raw, ts, dac metrics}}, temperature).

    The method supplies three functions: encode_fn(images) -> features (B, ...), run once per test image;
    logits_fn(features, classnames, key) -> logits (N, C) for a class list; tuned_text_fn(classnames, key) ->
    the method's normalised class text features (C, E), used by DAC. `key` names the dataset whose templates
    apply ("base"/"novel" splits use the training dataset's). Class lists arrive as tuples, so a method can
    memoise its text features per list with functools.lru_cache (each list is asked for several times).
    `val` = (features, labels) of the few-shot validation split when the method has already encoded it.
    Temperature scaling is fitted on that split (training classes; the returned `Temperature` carries its
    size as `fit_n`); DAC compares each test class's K nearest
    training classes under the tuned and the zero-shot (KgCoOp-template) text features. Raw, TS and DAC come
    from the same logits.
    """
    amp = dict(device_type=torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def encode(images):
        with torch.autocast(**amp):
            return encode_fn(images)

    def loader(items):
        return data.test_loader(items, n_px, device=device, num_workers=num_workers)

    base_names = tuple(train.classnames)
    with torch.no_grad():
        val_features, val_labels = val if val is not None else predict(encode, loader(train.val), device,
                                                                       "val (temperature)")
        temperature = Temperature(fit_temperature(logits_fn(val_features, base_names, dataset).float().cpu(),
                                                  val_labels), fit_n=len(val_labels))
        base_tuned = tuned_text_fn(base_names, dataset).float()
        base_zs = text_features(clip_model, data.prompts(dataset, train.classnames, "kgcoop"))
        metrics = {}
        for name, split in targets.items():
            key, names = (name if name in data.DATASETS else dataset), tuple(split.classnames)
            features, labels = predict(encode, loader(split.test), device, name)
            logits = logits_fn(features, names, key).float().cpu()  # (N, C)
            zs = base_zs if names == base_names and key == dataset else \
                text_features(clip_model, data.prompts(key, split.classnames, "kgcoop"))  # (C, E)
            factors = dac_factors(tuned_text_fn(names, key).float(), zs, base_tuned, base_zs).cpu()
            metrics[name] = evaluate_split(logits, labels, temperature, factors, out_dir, name)
            raw = metrics[name]["raw"]
            print(f"{name:>16}: acc {raw['acc']:6.2f}  ece {raw['ece']:6.2f}  (ts {metrics[name]['ts']['ece']:6.2f}, "
                  f"dac {metrics[name]['dac']['ece']:6.2f})  n={len(labels)}", flush=True)
    return metrics, temperature


# ------------------------------------------------------------------------------------- checkpoints
class _Inert:
    """Stands in for any class or function a checkpoint pickles (optimizers, schedulers, configs, defaultdicts):
    takes its arguments, its state and its items and keeps none of them, so loading such a file never runs
    code from it. The official trainers pickle a scheduler whose successor holds the SGD optimizer, whose
    momentum buffers sit in a defaultdict keyed by the parameters: the unpickler fills the stand-in with
    SETITEM/APPEND(S) and BUILD, which must succeed and be dropped."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):  # BUILD, with a plain or a (state, slotstate) pair
        pass

    def __setitem__(self, key, value):  # SETITEM(S) into a pickled mapping (a defaultdict, a config)
        pass

    def append(self, item):  # APPEND(S) into a pickled sequence (a deque)
        pass

    def extend(self, items):
        pass


class _InertUnpickler(pickle.Unpickler):
    _allowed = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
                ("torch", "Size"), ("torch", "device"), ("builtins", "set"), ("builtins", "frozenset"),
                ("builtins", "slice"), ("builtins", "complex")}

    def find_class(self, module, name):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        return _Inert


_inert_pickle = types.ModuleType("inert_pickle")
_inert_pickle.Unpickler = _InertUnpickler
_inert_pickle.load = lambda f, **kw: _InertUnpickler(f, **kw).load()


def read_checkpoint(path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a prompt checkpoint: ours (a flat dict of tensors) or one written by the official code
    ({"state_dict": {...}, "optimizer": ..., "scheduler": <pickled objects>}).

    Files with pickled objects are read with an unpickler that replaces every class or function it does not
    know by an inert stand-in (`_Inert`), so no code from the file runs; the official trainers' optimizer and
    scheduler objects become such stand-ins, filled and discarded, and the tensors come out. A file's problem is
    a UserError naming it. `allow_pickle=True` uses the full unpickler instead.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"the checkpoint {path} does not exist (--load); give the path of a prompt checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False,
                             pickle_module=pickle if allow_pickle else _inert_pickle)
        except Exception as e:
            raise UserError(f"cannot read the checkpoint {path} (--load): {e}; give a prompt checkpoint written "
                            f"by these scripts or by the official code") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise UserError(f"the checkpoint {path} holds no tensors (a {type(obj).__name__}, --load); give a prompt "
                        f"state dict such as {{'ctx': tensor}}")
    return tensors


def load_prompt_state(module: torch.nn.Module, state: dict, path) -> None:
    """Load learned prompt tensors into `module`, naming what is missing, extra or of the wrong shape."""
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in set(own) & set(state) if state[k].shape != own[k].shape]
    if missing or extra or wrong:
        raise UserError(f"the checkpoint {path} does not fit this model: missing {missing}, unexpected {extra}, "
                        f"wrong shape {wrong} (--load); check the method and its prompt options: --n-ctx, --ctx-init, "
                        f"prompt depth")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def save_prompt(state: dict, path) -> None:
    """Save the learned tensors (plain tensors only, loadable with weights_only=True) through
    `data.write_atomic`: serialised in memory first, so a full disk is reported as such, naming the file."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, buffer)
    data.write_atomic(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------------ summary
def load_results(root) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Every results.json below root: (complete records, [(path, why skipped)])."""
    records, skipped = [], []
    for path in sorted(Path(root).rglob("results.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            skipped.append((path, f"unreadable ({e})"))
            continue
        if not isinstance(rec, dict) or rec.get("complete") is not True:
            skipped.append((path, 'incomplete (no "complete": true)'))
        elif not isinstance(rec.get("metrics"), dict):
            skipped.append((path, "no metrics"))
        else:
            records.append(dict(rec, _path=str(path)))
    return records, skipped


def _column_order(names: Iterable[str]) -> list[str]:
    """The paper's dataset order (data.py's lists), then the rest alphabetically."""
    known = [*data.BASE_TO_NOVEL, *data.DG_TARGETS, *data.XD_TARGETS, *data.DEMO_DATASETS]
    rank = {k: i for i, k in enumerate(dict.fromkeys(known))}
    return sorted(set(names), key=lambda n: (rank.get(n, len(rank)), n))


def _harmonic(b: float, n: float) -> float:
    return 2 * b * n / (b + n) if b + n > 0 else 0.0


def _cells(runs: dict, cols: list[str], avg_cols: list[str], expected: dict) -> dict:
    """runs: {column: {seed: value}} -> {column or "average": (mean, std, partial) or None}.
    Average: mean of the column means, std over the seeds present in every averaged column of the per-seed
    average; None when a column is missing."""
    out = {}
    for col in cols:
        v = list(runs.get(col, {}).values())
        out[col] = (float(np.mean(v)), float(np.std(v)), len(v) < len(expected[col])) if v else None
    if avg_cols and all(out[c] for c in avg_cols):
        seeds = set.intersection(*(set(runs[c]) for c in avg_cols))
        per_seed = [np.mean([runs[c][s] for c in avg_cols]) for s in seeds]
        out["average"] = (float(np.mean([out[c][0] for c in avg_cols])),
                          float(np.std(per_seed)) if per_seed else float("nan"),
                          any(out[c][2] for c in avg_cols))
    else:
        out["average"] = None
    return out


def _harmonic_cells(base: dict, novel: dict, bc: dict, nc: dict, cols: list[str], avg_cols: list[str]) -> dict:
    """H from the mean base and novel accuracies (mean table, as the papers' tables); std over seeds of the
    per-seed H (std table)."""
    out = {}
    for col in [*cols, "average"]:
        if bc.get(col) is None or nc.get(col) is None:
            out[col] = None
            continue
        if col == "average":
            seeds = set.intersection(*(set(base[c]) & set(novel[c]) for c in avg_cols))
            pairs = [(np.mean([base[c][s] for c in avg_cols]), np.mean([novel[c][s] for c in avg_cols])) for s in seeds]
        else:
            pairs = [(base[col][s], novel[col][s]) for s in set(base[col]) & set(novel[col])]
        std = float(np.std([_harmonic(b, n) for b, n in pairs])) if pairs else float("nan")
        out[col] = (_harmonic(bc[col][0], nc[col][0]), std, bc[col][2] or nc[col][2])
    return out


def _fmt(cell, stat: int, star: bool = True) -> str:
    if cell is None or cell[stat] != cell[stat]:  # missing or NaN
        return "-"
    return f"{cell[stat]:.2f}" + ("*" if star and stat == 0 and cell[2] else "")


def _missing(table: dict, rows: list, cols: list[str], expected: dict) -> list[str]:
    """Lines 'method / calib (variants): column seed s, ...' for runs other rows have and this row lacks."""
    by_row = defaultdict(list)
    for method, calib, variant in rows:
        runs = table.get((method, calib, variant), {})
        gaps = [f"{c} seed {s}" for c in cols for s in sorted(expected[c]) if s not in runs.get(c, {})]
        if gaps:
            by_row[(method, calib, "; ".join(gaps))].append(variant)
    return [f"- {m} / {c} ({', '.join(v)}): {g}" for (m, c, g), v in sorted(by_row.items())]


def _observations(recs: list[dict], b2n: bool, splits: list[str], metrics: Iterable[str]) -> dict:
    """quantity -> (method, calib, variant) -> column -> seed -> value. Base-to-novel: quantity "split metric",
    column = dataset; otherwise quantity = metric, column = target (the metrics' split key)."""
    obs = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for r in recs:
        for split, by_variant in r["metrics"].items():
            if splits is not None and split not in splits:
                continue
            for variant, m in by_variant.items():
                for metric in metrics:
                    if metric not in m:
                        raise UserError(f"no metric {metric!r} in {split}/{variant}, {r['_path']}; "
                                        f"--metrics takes keys of its metrics, e.g. {', '.join(sorted(m))}")
                    q, col = (f"{split} {metric}", r["dataset"]) if b2n else (metric, split)
                    obs[q][(r["method"], r["calib"], variant)][col][r["seed"]] = m[metric]
    return obs


def _row_key(row: tuple[str, str, str]) -> tuple:
    """Table order of (method, calib, variant) rows: by method, calib none first, variants as in VARIANTS."""
    method, calib, variant = row
    return method, calib != "none", calib, VARIANTS.index(variant) if variant in VARIANTS else len(VARIANTS), variant


def _summarize_group(protocol: str, demo: bool, recs: list[dict], splits, metrics) -> tuple[list, list, dict, list]:
    """Markdown lines, CSV rows, {quantity: {row: cells}} for a radar plot (else {}) and columns of one group."""
    tag = "DEMO " if demo else ""
    b2n = all("base" in r["metrics"] for r in recs)
    splits = splits or (["base", "novel"] if b2n else None)
    obs = _observations(recs, b2n, splits, metrics)
    exclude = set() if b2n else {r["dataset"] for r in recs}  # xd/dg: the training dataset is no target
    rows = sorted({row for t in obs.values() for row in t}, key=_row_key)
    cols = _column_order(c for t in obs.values() for runs in t.values() for c in runs)
    avg_cols = [c for c in cols if c not in exclude]
    expected = {q: {c: set().union(*(t[row].get(c, {}).keys() for row in t)) for c in cols} for q, t in obs.items()}
    tables = {q: {row: _cells(obs[q][row], cols, avg_cols, expected[q]) for row in obs[q]} for q in obs}
    quantities = [f"{s} {m}" if b2n else m for m in metrics for s in (splits if b2n else [None])]
    quantities = [q for q in dict.fromkeys(quantities) if q in obs]
    if "base acc" in obs and "novel acc" in obs:
        ba, na = obs["base acc"], obs["novel acc"]
        tables["H"] = {row: _harmonic_cells(ba[row], na[row], tables["base acc"][row], tables["novel acc"][row],
                                            cols, avg_cols) for row in ba if row in na}
        quantities.insert(quantities.index("novel acc") + 1, "H")
    md = ["", f"## {tag}protocol {protocol}"]
    if b2n and "H" in tables:  # the paper's headline layout: averages over the datasets, one row per variant
        head = [q for q in ("base acc", "novel acc", "H", "base ece", "novel ece") if q in tables]
        md += ["", f"### {tag}{protocol}: overview, average over {len(avg_cols)} dataset(s), mean over seeds (%)", "",
               "| method | calib | variant | " + " | ".join(head) + " |", "|" + "---|" * (3 + len(head))]
        md += ["| " + " | ".join([*row, *(_fmt((tables[q].get(row) or {}).get("average"), 0) for q in head)]) + " |"
               for row in rows]
    if exclude:
        md += ["", f"Trained on {', '.join(sorted(exclude))}; the average is over the other targets."]
    header = ["method", "calib", "variant", *cols, "average"]
    csv_rows, last_gaps = [], None
    for q in quantities:
        for stat, stat_name in ((0, "mean"), (1, "std")):
            md += ["", f"### {tag}{protocol}: {q} (%), {stat_name} over seeds", "",
                   "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for row in rows:
                cells = tables[q].get(row) or dict.fromkeys([*cols, "average"])
                md.append("| " + " | ".join([*row, *(_fmt(cells[c], stat) for c in header[3:])]) + " |")
                csv_rows.append({"protocol": protocol, "demo": demo, "table": q, "stat": stat_name,
                                 **dict(zip(header, row)), **{c: _fmt(cells[c], stat, star=False) for c in header[3:]}})
            if stat == 0:
                if any(cells[c] and cells[c][2] for cells in tables[q].values() for c in cols):
                    md += ["", "\\* mean over fewer seeds than other rows have."]
                runs_q = q if q in obs else quantities[0]  # H has the runs of the accuracy tables
                gaps = _missing(obs[runs_q], rows, cols, expected[runs_q])
                if gaps and gaps != last_gaps:  # list each set of missing runs once, below its first table
                    md += ["", "Missing runs (shown as -):", *gaps]
                last_gaps = gaps
    return md, csv_rows, (tables if b2n and len(cols) >= 3 else {}), cols


def _write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """rows as CSV through `data.write_atomic`; fields: the columns (default: the first row's keys)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields or list(rows[0] if rows else []), restval="")
    writer.writeheader()
    writer.writerows(rows)
    data.write_atomic(path, text.getvalue().encode())


def summarize(root, splits: list[str] | None = None, metrics: Iterable[str] = ("acc", "ece"), write: bool = True) -> str:
    """Paper-shaped tables of every complete results.json below root; Markdown returned (and, when write, saved
    with CSV as root/summary.md, root/summary.csv, plus summary_radar*.png of per-dataset ECE).

    Groups by (protocol, demo); demo groups say DEMO in every title. Base-to-novel groups (metrics keyed
    base/novel): rows method x calib x variant, columns datasets + average, a table per split x metric and H.
    Other groups (xd/dg, metrics keyed by target): columns = targets, average over the targets other than the
    training dataset. Cells: mean and population std over seeds; '*' = fewer seeds than other rows; '-' =
    missing, listed. H: of the mean accuracies (as the papers' tables); its std is over per-seed H.
    """
    root = Path(root)
    metrics = list(metrics)
    records, skipped = load_results(root)
    md = [f"# Summary of {root}", "", f"{len(records)} complete result files, {len(skipped)} skipped."]
    csv_rows, radars, all_cols = [], [], []
    groups = defaultdict(list)
    for r in records:
        groups[(str(r.get("protocol")), bool(r.get("demo")))].append(r)
    for (protocol, demo), recs in sorted(groups.items()):
        lines, rows, radar, cols = _summarize_group(protocol, demo, recs, splits, metrics)
        md += lines
        csv_rows += rows
        all_cols += cols
        if radar:
            radars.append((protocol, demo, cols, radar))
    if skipped:
        md += ["", "## Skipped result files", *(f"- {p}: {why}" for p, why in skipped)]
    text = "\n".join(md) + "\n"
    if write:
        data.write_atomic(root / "summary.md", text.encode())
        fields = ["protocol", "demo", "table", "stat", "method", "calib", "variant", *dict.fromkeys(all_cols), "average"]
        _write_csv(root / "summary.csv", csv_rows, fields)
        for protocol, demo, cols, tables in radars:
            name = "summary_radar.png" if len(radars) == 1 else f"summary_radar_{protocol}{'_demo' * demo}.png"
            _radar(root / name, cols, tables, f"{'DEMO ' * demo}{protocol}")
    return text


def _radar(path: Path, cols: list[str], tables: dict, title: str) -> None:
    """Per-dataset ECE (raw variant) of each method x calib on a radar chart, base and novel side by side."""
    fig = Figure(figsize=(11, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    angles = np.linspace(0, 2 * np.pi, len(cols), endpoint=False)
    for i, split in enumerate(("base", "novel")):
        ax = fig.add_subplot(1, 2, i + 1, projection="polar")
        for (method, calib, variant), cells in sorted(tables.get(f"{split} ece", {}).items()):
            if variant == "raw":
                vals = [cells[c][0] if cells[c] else np.nan for c in cols]
                ax.plot(np.append(angles, angles[0]), vals + vals[:1], marker="o", ms=3, label=f"{method} / {calib}")
        ax.set_xticks(angles, cols, fontsize=7)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{title}: {split} ECE (%)")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.savefig(path)


# ------------------------------------------------------------------------------ the paper's published tables
PUBLISHED = Path(__file__).resolve().parent / "published" / "tcpt_tables.csv"
PUBLISHED_COLUMNS = ["split", "method", "calib", "metric", *data.BASE_TO_NOVEL, "average", "note"]
PAPER_SETTING = {"protocol": "base2new", "shots": 16, "backbone": "ViT-B/16"}  # Tables 1-2 of the paper
PAPER_POST_HOC = ("ts", "dac")  # calibrations in the paper's tables, post-hoc variants of the none runs here
ROUNDING = 0.005  # half a unit of the published numbers' last digit: their own uncertainty
B2N_SPLITS = ("base", "novel")
ANALYSIS_METRICS = ("acc", "confidence", "ece", "margin_mean", "margin_std")
ANALYSIS_COLUMNS = ("acc", "confidence", "gap", "ece", "margin_mean", "margin_std")  # gap: confidence - acc
PAPER_CSV_FIELDS = ["method", "calib", "variant", "paper_method", "paper_calib", "split", "metric", "dataset",
                    "datasets", "ours_mean", "ours_std", "n_seeds", "published", "diff", "flag"]
COMPARISON_HEAD = "acc: ours | acc: paper | acc: Δ | ece: ours | ece: paper | ece: Δ |"  # of paper.md's tables


def load_published(path=PUBLISHED) -> dict[tuple[str, str, str, str], dict]:
    """The paper's Tables 1-2 (published/README.md): {(split, method, calib, metric): {dataset key: value,
    "average": value as printed, "note": text}}. Entries the paper does not report have no row."""
    path = Path(path)
    restore = "restore it with `git checkout -- published/`"
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except OSError as e:
        raise UserError(f"cannot read the published table ({e.strerror or e}), {path}; {restore}") from None
    if reader.fieldnames != PUBLISHED_COLUMNS:
        raise UserError(f"the published table's columns are {reader.fieldnames}, not {PUBLISHED_COLUMNS}, {path}; "
                        f"{restore}")
    table = {}
    for line, row in enumerate(rows, start=2):
        key = (row["split"], row["method"], row["calib"], row["metric"])
        try:
            values = {c: float(row[c]) for c in PUBLISHED_COLUMNS[4:-1]}
        except (TypeError, ValueError):
            raise UserError(f"line {line} of the published table lacks a number, {path}; {restore}") from None
        if key in table:
            raise UserError(f"line {line} of the published table repeats {'/'.join(key)}, {path}; {restore}")
        table[key] = {**values, "note": row["note"] or ""}
    return table


def paper_row(method: str, calib: str, variant: str) -> tuple[str, str] | None:
    """The paper's (method, calib) for one of our rows: its ts and dac are our none runs' post-hoc variants,
    and it reports no post-hoc variant of a calibrated run."""
    if variant == "raw":
        return None if calib in PAPER_POST_HOC else (method, calib)
    return (method, variant) if calib == "none" and variant in PAPER_POST_HOC else None


def _paper_records(records: list[dict]) -> tuple[list[dict], list[str]]:
    """The records comparable with the paper's tables, and one line per kind of record left out."""
    why = {"demo": "demo world runs (synthetic datasets, not the paper's)",
           "protocol": f"runs of another protocol than {PAPER_SETTING['protocol']}",
           "setting": f"runs with other shots or backbone than the paper's {PAPER_SETTING['shots']} shots, "
                      f"{PAPER_SETTING['backbone']}",
           "dataset": "runs of datasets the paper does not report"}
    kept, left = [], defaultdict(int)
    for r in records:
        reason = ("demo" if r.get("demo") else "protocol" if r.get("protocol") != PAPER_SETTING["protocol"] else
                  "setting" if any(r.get(k) not in (None, PAPER_SETTING[k]) for k in ("shots", "backbone")) else
                  "dataset" if r.get("dataset") not in data.BASE_TO_NOVEL else None)
        if reason:
            left[reason] += 1
        else:
            kept.append(r)
    return kept, [f"{why[reason]}: {n}" for reason, n in left.items()]


def _seed_cell(values: list[float], published: float | None, mean: float | None = None) -> dict:
    """Ours against a published number: mean (the given one, else of the values), sample std (n - 1) and n
    of the per-seed values, the difference ours - published, and the verdict `flag`."""
    n = len(values)
    mean = float(np.mean(values)) if mean is None else mean
    sd = float(np.std(values, ddof=1)) if n > 1 else float("nan")
    return {"mean": mean, "sd": sd, "n": n, "published": published,
            "diff": None if published is None else mean - published, "flag": _flag(mean, sd, n, published)}


def _flag(mean: float, sd: float, n: int, published: float | None) -> str:
    """'>2 SE' where the published number lies outside mean +- 2 standard errors (sd / sqrt(n)), widened by
    the published number's rounding, so zero spread flags any printed difference; '1 seed' where one seed
    gives no spread to judge by; '' otherwise, or with nothing published."""
    if published is None:
        return ""
    if n < 2:
        return "1 seed" if n == 1 else "no seed in common"
    return ">2 SE" if abs(mean - published) > 2 * sd / np.sqrt(n) + ROUNDING else ""


def _average_cell(runs: dict[str, dict], published: dict) -> dict:
    """The average over the datasets we ran ({dataset: {seed: value}}): ours is the mean of the dataset means,
    its spread that of the per-seed averages over the seeds all of them have; the published number is the
    mean of the paper's per-dataset numbers of the same datasets."""
    cols = list(runs)
    seeds = set.intersection(*(set(runs[c]) for c in cols))
    per_seed = [float(np.mean([runs[c][s] for c in cols])) for s in sorted(seeds)]
    mean = float(np.mean([np.mean(list(runs[c].values())) for c in cols]))
    pub = float(np.mean([published[c] for c in cols])) if published and all(c in published for c in cols) else None
    return dict(_seed_cell(per_seed, pub, mean), datasets=len(cols))


def paper_comparison(records: list[dict], published: dict) -> dict:
    """{(method, calib, variant): {(split, metric): {dataset key or "average": cell}}} for each of our rows
    that the paper reports (cells: `_seed_cell`, "average": `_average_cell`)."""
    obs = _observations(records, True, list(B2N_SPLITS), ["acc", "ece"])
    out = {}
    for row in sorted({row for t in obs.values() for row in t}, key=_row_key):
        target = paper_row(*row)
        if target is None or not any(k[1:3] == target for k in published):
            continue
        out[row] = {}
        for split in B2N_SPLITS:
            for metric in ("acc", "ece"):
                runs = obs[f"{split} {metric}"].get(row, {})
                pub = published.get((split, *target, metric), {})
                cells = {c: _seed_cell(list(runs[c].values()), pub.get(c)) for c in _column_order(runs)}
                cells["average"] = _average_cell(runs, pub) if runs else None
                out[row][(split, metric)] = cells
    return out


def _fmt_ours(cell: dict | None) -> str:
    if cell is None:
        return "-"
    return f"{cell['mean']:.2f}" + (f" ± {cell['sd']:.2f}" if cell["n"] > 1 else "") + f" (n={cell['n']})"


def _fmt_diff(cell: dict | None) -> str:
    if cell is None or cell["diff"] is None:
        return "-"
    return f"{cell['diff']:+.2f}" + (f" ({cell['flag']})" if cell["flag"] else "")


def _comparison_cells(cells: dict, split: str, col: str) -> list[str]:
    """ours | paper | difference for acc and ece of one split and column."""
    out = []
    for metric in ("acc", "ece"):
        cell = cells[(split, metric)].get(col)
        pub = "-" if cell is None or cell["published"] is None else f"{cell['published']:.2f}"
        out += [_fmt_ours(cell), pub, _fmt_diff(cell)]
    return out


def _comparison_md(comparison: dict, published: dict) -> list[str]:
    """The overview table and one per-dataset table per row of `paper_comparison`."""
    md = ["", "### ours against the paper: overview, average over the datasets we ran", "",
          "| method | calib | variant | split | datasets | " + COMPARISON_HEAD, "|" + "---|" * 11]
    for row, cells in comparison.items():
        for split in B2N_SPLITS:
            avg = cells[(split, "acc")]["average"] or cells[(split, "ece")]["average"]
            md.append("| " + " | ".join([*row, split, str(avg["datasets"]) if avg else "0",
                                         *_comparison_cells(cells, split, "average")]) + " |")
    md += ["", "Ours: the mean over the datasets we ran of each dataset's mean over seeds; ± and n over the seeds "
               "all of them have, of the per-seed average. Paper: the mean of its per-dataset numbers of the "
               "same datasets (not its printed average, which some rows do not match; see published/README.md)."]
    for row, cells in comparison.items():
        target = paper_row(*row)
        md += ["", f"### {' / '.join(row)}, against the paper's {' / '.join(target)}", "",
               "| dataset | split | " + COMPARISON_HEAD, "|" + "---|" * 8]
        cols = [c for c in _column_order(c for t in cells.values() for c in t) if c != "average"]
        for col in [*cols, "average"]:
            for split in B2N_SPLITS:
                md.append(f"| {col} | {split} | " + " | ".join(_comparison_cells(cells, split, col)) + " |")
        md += [f"- the paper's {s} {m} row: {published[(s, *target, m)]['note']}" for s in B2N_SPLITS
               for m in ("acc", "ece") if published.get((s, *target, m), {}).get("note")]
    return md


def _num(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.2f}"  # missing or NaN


def _comparison_csv(comparison: dict) -> list[dict]:
    rows = []
    for (method, calib, variant), cells in comparison.items():
        paper_method, paper_calib = paper_row(method, calib, variant)
        for (split, metric), by_col in cells.items():
            for col, cell in by_col.items():
                if cell is None:
                    continue
                rows.append({"method": method, "calib": calib, "variant": variant, "paper_method": paper_method,
                             "paper_calib": paper_calib, "split": split, "metric": metric, "dataset": col,
                             "datasets": cell.get("datasets", 1), "ours_mean": _num(cell["mean"]),
                             "ours_std": _num(cell["sd"]), "n_seeds": cell["n"], "published": _num(cell["published"]),
                             "diff": _num(cell["diff"]), "flag": cell["flag"]})
    return rows


def miscalibration(records: list[dict]) -> dict:
    """{(method, calib): {split: {dataset: {metric: mean over seeds, "gap": confidence - acc}}}} of the raw
    logits: the paper's "dual miscalibration" (gap < 0 under-confident, > 0 over-confident) beside the margins
    its method acts on and the ECE."""
    obs = _observations(records, True, list(B2N_SPLITS), ANALYSIS_METRICS)
    means = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))  # (method, calib) -> split -> dataset -> metric
    for quantity, table in obs.items():
        split, metric = quantity.split()
        for (method, calib, variant), runs in table.items():
            if variant != "raw":
                continue
            for col, seeds in runs.items():
                means[(method, calib)][split][col][metric] = float(np.mean(list(seeds.values())))
    out = {}
    for key in sorted(means, key=lambda k: _row_key((*k, "raw"))):
        out[key] = {}
        for split in (s for s in B2N_SPLITS if s in means[key]):
            by_col = means[key][split]
            out[key][split] = {c: {**by_col[c], "gap": by_col[c]["confidence"] - by_col[c]["acc"]}
                               for c in _column_order(by_col)}
    return out


def _mean_over(by_col: dict) -> dict:
    """The mean over the datasets of each analysis quantity."""
    return {k: float(np.mean([m[k] for m in by_col.values()])) for k in ANALYSIS_COLUMNS}


def _miscalibration_md(analysis: dict) -> list[str]:
    md = ["", "## Dual miscalibration: confidence - accuracy, margins and ECE", "",
          "Raw logits; each dataset's mean over seeds, then the mean over the datasets. conf - acc below 0 is "
          "under-confidence, above 0 over-confidence: the paper finds prompt tuning under-confident on base and "
          "over-confident on novel classes. Margin: the true class's logit minus the runner-up's; its mean and "
          "std over the test images."]
    for (method, calib), by_split in analysis.items():
        md += ["", f"### {method} / {calib}: confidence - accuracy and margins", "",
               "| split | datasets | over-confident on | acc | confidence | conf - acc | ece | margin mean "
               "| margin std |", "|" + "---|" * 9]
        for split, by_col in by_split.items():
            avg, over = _mean_over(by_col), sum(m["gap"] > 0 for m in by_col.values())
            md.append(f"| {split} | {len(by_col)} | {over} of {len(by_col)} | "
                      + " | ".join(f"{avg[k]:.2f}" for k in ANALYSIS_COLUMNS) + " |")
    return md


def _miscalibration_csv(analysis: dict) -> list[dict]:
    rows = []
    for (method, calib), by_split in analysis.items():
        for split, by_col in by_split.items():
            for col, values in [*by_col.items(), ("average", _mean_over(by_col))]:
                rows.append({"method": method, "calib": calib, "split": split, "dataset": col,
                             "datasets": len(by_col) if col == "average" else 1,
                             **{("conf_minus_acc" if k == "gap" else k): _num(values[k]) for k in ANALYSIS_COLUMNS}})
    return rows


def _miscalibration_figure(path: Path, analysis: dict) -> bool:
    """Bars of confidence - accuracy per dataset, base and novel classes side by side, calib none against ours,
    one row of panels per method; False, and nothing written, when no method ran either calibration."""
    calibs = ("none", "ours")
    methods = sorted({m for m, c in analysis if c in calibs})
    if not methods:
        return False
    fig = Figure(figsize=(12, 3.4 * len(methods)), dpi=100)
    FigureCanvasAgg(fig)
    for i, method in enumerate(methods):
        for j, split in enumerate(B2N_SPLITS):
            # base and novel on one scale, so the two miscalibrations compare at a glance
            ax = fig.add_subplot(len(methods), 2, 2 * i + j + 1, sharey=fig.axes[-1] if j else None)
            runs = {c: analysis.get((method, c), {}).get(split, {}) for c in calibs}
            cols = _column_order(col for by_col in runs.values() for col in by_col)
            x = np.arange(len(cols))
            for k, calib in enumerate(calibs):
                gaps = [runs[calib][c]["gap"] if c in runs[calib] else np.nan for c in cols]
                ax.bar(x + (k - 0.5) * 0.4, gaps, 0.4, label=f"calib {calib}")
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xticks(x, cols, rotation=40, ha="right", fontsize=7)
            ax.set(title=f"{method}: {split} classes", ylabel="confidence - accuracy (points)")
            ax.legend(fontsize=7)
    fig.suptitle("confidence - accuracy per dataset (raw logits, mean over seeds): below 0 under-confident, "
                 "above 0 over-confident", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return True


def _not_in_paper(records: list[dict], compared: Iterable[tuple]) -> list[str]:
    """'method / calib (variants)' for our rows that have no published counterpart."""
    rows = {(r["method"], r["calib"], v) for r in records for s in B2N_SPLITS for v in r["metrics"].get(s, {})}
    by_run = defaultdict(list)
    for method, calib, variant in sorted(rows - set(compared), key=_row_key):
        by_run[(method, calib)].append(variant)
    return [f"{m} / {c} ({', '.join(v)})" for (m, c), v in by_run.items()]


def paper_report(root, write: bool = True) -> tuple[str, bool]:
    """Our base-to-novel runs below root beside the paper's Tables 1-2 (published/tcpt_tables.csv), and its
    dual-miscalibration view of them: (Markdown, True), saved when write as root/paper.md, paper.csv (the
    comparison), paper_analysis.csv and paper_miscalibration.png; or (a one-line note, False), and nothing
    written, when no run is comparable with the paper (demo runs never are)."""
    root = Path(root)
    records, _ = load_results(root)
    kept, left_out = _paper_records(records)
    if not kept:
        if records and all(r.get("demo") for r in records):
            demo = ", ".join(_column_order({r["dataset"] for r in records}))
            return (f"--paper: ignored for the demo datasets ({demo}): they are synthetic, and the paper's numbers "
                    f"are of its 11 real datasets, so there is nothing to compare"), False
        return (f"--paper: nothing to compare in {root}: no complete {PAPER_SETTING['protocol']} run of the paper's "
                f"datasets with {PAPER_SETTING['shots']} shots and {PAPER_SETTING['backbone']}"), False
    published = load_published()
    comparison = paper_comparison(kept, published)
    analysis = miscalibration(kept)
    md = [f"# Our numbers beside the paper's: {root}", "",
          f"Paper: published/tcpt_tables.csv, Tables 1-2 of Sharifdeen et al., CVPR 2026, as printed in the "
          f"README of github.com/ashshaksharifdeen/TCPT ({PAPER_SETTING['protocol']}, {PAPER_SETTING['backbone']}, "
          f"{PAPER_SETTING['shots']} shots; seeds not stated there, the paper says 3). Its ts and dac rows are "
          f"compared with the ts and dac variants of our calib none runs.",
          "", "Ours: mean ± sample std (n - 1) over n seeds. Δ = ours - paper. (>2 SE): the paper's number lies "
              "outside our mean ± 2 std/√n (widened by 0.005, its rounding): more than seed noise. (1 seed): one "
              "seed, no spread to judge by. -: not run, or not published.",
          "", f"{len(kept)} result files compared."]
    md += [f"Left out: {line}." for line in left_out]
    extra = _not_in_paper(kept, comparison)
    md += [f"Not in the paper's tables: {'; '.join(extra)}."] if extra else []
    md += _comparison_md(comparison, published) if comparison else ["", "No run of a row the paper reports."]
    md += _miscalibration_md(analysis)
    text = "\n".join(md) + "\n"
    if write:
        data.write_atomic(root / "paper.md", text.encode())
        _write_csv(root / "paper.csv", _comparison_csv(comparison), PAPER_CSV_FIELDS)
        _write_csv(root / "paper_analysis.csv", _miscalibration_csv(analysis))
        _miscalibration_figure(root / "paper_miscalibration.png", analysis)
    return text, True


def plan(datasets: list[str], calibs: list[str], protocol: str) -> list[tuple[str, str]]:
    """run.sh's up-front check: [(dataset key, its folder under the data root)], the protocol's default datasets
    when none are given; an unknown dataset, calibration or protocol is a UserError before anything runs."""
    if protocol not in data.PROTOCOLS:
        raise UserError(f"--protocol must be one of {', '.join(data.PROTOCOLS)}, got {protocol!r}")
    unknown = [c for c in calibs if c not in losses.CALIBS]
    if unknown:
        raise UserError(f"unknown calibration(s) {' '.join(unknown)} in --calibs; choose from {' '.join(losses.CALIBS)}")
    keys = datasets or (data.BASE_TO_NOVEL if protocol == "base2new" else ["imagenet"])
    unknown = [k for k in keys if k not in data.DATASETS]
    if unknown:
        raise UserError(f"unknown dataset(s) {' '.join(unknown)} in --datasets; choose from {' '.join(data.DATASETS)}")
    return [(k, data.DATASETS[k].folder) for k in keys]


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summarize", help="tables of every results.json below OUTPUT_DIR")
    s.add_argument("output_dir")
    s.add_argument("--split", nargs="+", help="metric splits to tabulate (default: base novel, or every target)")
    s.add_argument("--metrics", nargs="+", default=["acc", "ece"], help="compute_metrics keys (default: acc ece)")
    s.add_argument("--paper", action="store_true",
                   help="also set our base-to-novel runs beside the paper's published Tables 1-2 (published/) and "
                        "write paper.md, paper.csv, paper_analysis.csv, paper_miscalibration.png")
    c = sub.add_parser("plan", help="check run.sh's datasets, calibrations and protocol; print 'key folder' lines")
    c.add_argument("--datasets", default="", help="space-separated dataset keys (default: the protocol's)")
    c.add_argument("--calibs", default="none", help="space-separated calibrations")
    c.add_argument("--protocol", default="base2new", help=f"one of {', '.join(data.PROTOCOLS)}")
    a = parser.parse_args(argv)
    if a.command == "plan":
        for key, folder in plan(a.datasets.split(), a.calibs.split(), a.protocol):
            print(key, folder)
        return
    if not Path(a.output_dir).is_dir():
        parser.error(f"OUTPUT_DIR {a.output_dir} is not a directory")
    text = summarize(a.output_dir, a.split, a.metrics)
    paper, compared = paper_report(a.output_dir) if a.paper else ("", False)
    tables = text + paper if compared else text
    print(tables, end="")
    # Repeat the overview tables last, where a terminal leaves them in view.
    blocks = [b for b in tables.split("\n### ") if ": overview," in b.split("\n", 1)[0]]
    if blocks:
        print("\n" + "\n".join("### " + b.split("\n\n###")[0].split("\n## ")[0].rstrip() + "\n" for b in blocks), end="")
    if paper and not compared:
        print("\n" + paper)  # the one line saying why there is no comparison
    written = ("; the comparison with the paper to paper.md, paper.csv, paper_analysis.csv, paper_miscalibration.png"
               if compared else "")
    print(f"\n(tables written to {Path(a.output_dir) / 'summary.md'} and summary.csv{written})")


if __name__ == "__main__":
    with user_errors():
        main(sys.argv[1:])
