"""Speed benchmark of the method scripts and the training data path. Not collected by pytest (no test_ prefix).

Every methods/*.py except zeroshot.py is found and run in-process in a fresh worker subprocess, with
ViT-B/16-sized random weights (clip.model.CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12), saved once
as a state dict and passed as --backbone PATH: no download) on synthetic JPEGs in a real split-file layout
(data.py's reader for CoOp's split_zhou_*.json files), at each method's recipe batch size. The method
files are not changed: the worker times them from outside,

- training step: an optimizer step post hook timestamps each step (torch.cuda.synchronize first on CUDA);
  step time = time between consecutive steps, the first step (warm-up) left out; the training loader is
  cut after --steps + 1 batches, so the epoch ends early and evaluation follows as in a normal run;
- data time: each fetch from the training batches (data.TrainImages, or data.FeatureViews) is timed (what the
  step waits for, on CUDA the launch of the augmentation kernels: they run asynchronously);
- evaluation: from the end of training (eval.save_prompt) to eval.write_results, over the val + test
  images of the protocol; every image that enters a 3-channel Conv2d (the patch embedding) is counted,
  so "enc/img" = images encoded per evaluated image (1.00 = each image encoded once);
- memory: CUDA max_memory_allocated over the step(s), or on the CPU the growth of the process's peak
  resident size (VmHWM, reset through /proc/self/clear_refs after malloc_trim) over the step(s);
- on CUDA the timed steps run under torch.cuda.set_sync_debug_mode("warn") and every synchronising call is
  listed by source line (the per-epoch .item() calls fall outside the timed steps).

Sections (--sections, comma-separated; default all but featurecache):
  train         per method: median step time, data share, eval images/s, peak step memory, syncs (CUDA)
  data          the training data path alone at batch 32 (500x375 JPEGs to 224 px): images/s of data.TrainImages
                against the PIL loader it replaced (decoded images, data.train_transform in DataLoader workers),
                on the CPU with 1 and 2 threads, on CUDA with the default worker count
  cache         CoOp at batch 32: data share with the training images in host memory (--image-cache-gb 0) and
                on the training device (the default)
  cocoop        CoCoOp's batched text encoding (prompts cut after the last EOT) against a per-image loop of the
                same prompts and against the official per-image loop of full 77-token prompts, at batch 4
  memory        --checkpoint-text off/on for CoOp, KgCoOp, ProGrad (batch 32) and CoCoOp (batch 1), training
                step memory at --memory-classes training classes, scaled linearly to 1000 classes
  demo          wall time of an end-to-end run (training + evaluation) of each method on demo_shapes
                (python demo.py prepare), --epochs epochs
  featurecache  CoOp with and without --feature-cache K on the three demo datasets, seeds 1-3: training time,
                accuracy and ECE (base and novel, raw)

Examples:
    python tests/bench.py --quick                                # a few minutes on a laptop CPU
    python tests/bench.py --device cuda --out bench.json         # the README's table
    python tests/bench.py --sections featurecache --epochs 20    # the --feature-cache study

CPU timing runs use MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296
MALLOC_TOP_PAD_=1073741824 (glibc keeps freed memory instead of unmapping and re-faulting it every step);
memory runs use MALLOC_MMAP_THRESHOLD_=65536 (tensor-sized blocks are unmapped when freed, so the resident
size follows the live allocations).
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VIT_B16 = (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)  # clip.model.CLIP's arguments for ViT-B/16
TIMING_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296",
              "MALLOC_TOP_PAD_": "1073741824"}
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
SECTIONS = ("data", "train", "cache", "cocoop", "memory", "demo", "featurecache")
MEMORY_METHODS = {"coop": 32, "kgcoop": 32, "prograd": 32, "cocoop": 1}  # batch size of each memory run
DEMO_DATASETS = ("demo_shapes", "demo_colours", "demo_patterns")


def discover_methods() -> list[str]:
    return sorted(p.stem for p in (ROOT / "methods").glob("*.py")
                  if p.stem != "zeroshot" and not p.stem.startswith("_"))


def load_method(name: str):
    spec = importlib.util.spec_from_file_location(f"method_{name}", ROOT / "methods" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ assets
def backbone_file(work: Path) -> Path:
    """ViT-B/16-sized CLIP with random weights (OpenAI's initialisation), saved once as a plain state dict."""
    import clip

    path = work / "vit_b16_random.pt"
    if not path.exists():
        print(f"writing random ViT-B/16 weights to {path}", flush=True)
        torch.manual_seed(0)
        model = clip.model.CLIP(*VIT_B16)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    return path


def make_split_dataset(root: Path, key: str, classes: int, per_class: tuple[int, int, int],
                       size: tuple[int, int]) -> Path:
    """`classes` classes of smooth random JPEGs (width, height = size) in dataset `key`'s split-file layout
    (split_zhou_<Name>.json under the dataset folder, images under its image folder); per_class = (train, val,
    test) images per class. The split file is written last, so a present one means a complete dataset."""
    import data
    from PIL import Image

    info = data.DATASETS[key]
    if info.layout != "split" or info.n_classes not in (None, classes):
        raise ValueError(f"{key} is not a split-file dataset that accepts {classes} classes")
    folder = root / info.folder
    split_path = folder / info.split_file
    if split_path.exists():
        return root
    rng = np.random.default_rng(0)
    split = {"train": [], "val": [], "test": []}
    for label in range(classes):
        name = f"synthetic object {label}"
        (folder / info.images / f"c{label:04d}").mkdir(parents=True, exist_ok=True)
        for part, count in zip(("train", "val", "test"), per_class):
            for i in range(count):
                # a smooth colour field plus noise: compresses and decodes like a photo, unlike pure noise
                low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
                pixels = np.asarray(low, dtype=np.int16) + rng.integers(-8, 9, (size[1], size[0], 3))
                rel = f"c{label:04d}/{part}_{i}.jpg"
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / info.images / rel, quality=90)
                split[part].append([rel, label, name])
    tmp = split_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(split))
    os.replace(tmp, split_path)
    return root


def dataset_for(work: Path, classes: int, per_class: tuple[int, int, int], size: tuple[int, int]) -> tuple[Path, str]:
    """(data root, dataset key): the eurosat layout for 10 classes, else demo_shapes' (the split-file keys
    that accept any number of classes are the demo ones)."""
    key = "eurosat" if classes == 10 else "demo_shapes"
    root = work / f"data_{key}_{classes}c_{'-'.join(map(str, per_class))}_{size[0]}x{size[1]}"
    print(f"synthetic dataset {root} ({classes} classes, {per_class} train/val/test per class)", flush=True)
    return make_split_dataset(root, key, classes, per_class, size), key


# ------------------------------------------------------------------------------------------ worker side
class StopBench(Exception):
    """Raised from the optimizer hook to end a memory run after its measured step (no evaluation)."""


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class MemoryMeter:
    """Peak memory growth over an interval: CUDA max allocated, or the CPU process's peak resident size."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.base = self.peak = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap memory back, so the baseline is live memory
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident size
            self.base = _status_mb("VmRSS")
        except OSError:
            self.base = None  # not Linux: no CPU memory figure

    def stop(self) -> dict:
        if self.base is None:
            return {}
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() / 2**20
            kind = "cuda_max_allocated"
        else:
            self.peak = _status_mb("VmHWM")
            kind = "cpu_peak_rss"
        return {"kind": kind, "base_mb": self.base, "peak_mb": self.peak, "growth_mb": self.peak - self.base}


class MethodProbe:
    """What the patches of one method run record (self.st) and the timing hooks they share: a training batch
    arriving, the end of an optimizer step, the sync mode of the timed steps."""

    def __init__(self, spec: dict):
        self.device = torch.device(spec["device"])
        self.cuda = self.device.type == "cuda"
        self.memory_run = spec["mode"] == "memory"
        self.limit = 1 if self.memory_run else spec["steps"] + 1  # training batches: one warm-up step + the timed ones
        self.st = {"batches": 0, "data_s": [], "data_cpu_s": [], "post": [], "post_cpu": [], "encoded": 0,
                   "train": True, "syncs": {}, "predict_s": 0.0}
        self.meter = MemoryMeter(self.device)
        self.sync_debug = self.cuda and spec.get("sync_debug", False)

    def set_sync_mode(self, on: bool) -> None:
        if self.sync_debug:
            torch.cuda.set_sync_debug_mode("warn" if on else 0)

    def synchronize(self) -> None:
        if self.cuda:
            self.set_sync_mode(False)  # our own timing sync is not the method's
            torch.cuda.synchronize()
            self.set_sync_mode(self.st["batches"] < self.limit)

    def batch_arrived(self) -> None:  # a training batch is in hand: a step starts
        if self.st["batches"] == 1:
            self.meter.start()
        if self.st["batches"] == 2:  # the first timed step: watch for host-device syncs from here
            self.set_sync_mode(True)

    def after_step(self, optimizer, args, kwargs) -> None:  # the optimizer step post hook
        st = self.st
        self.synchronize()
        st["post"].append(time.perf_counter())
        st["post_cpu"].append(time.process_time())
        if st["batches"] >= self.limit and "memory" not in st:
            self.set_sync_mode(False)
            st["memory"] = self.meter.stop()
            if self.memory_run:
                raise StopBench

    def count_syncs(self, recorded: list) -> None:
        """The synchronisation warnings of set_sync_debug_mode, counted by source line."""
        for w in recorded:
            where = f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}"
            self.st["syncs"][where] = self.st["syncs"].get(where, 0) + 1


def training_patches(probe: MethodProbe) -> list:
    """(object, attribute, replacement) for the training batches (data.TrainImages or data.FeatureViews): each
    fetch timed, the epoch cut after probe.limit batches."""
    import data

    st = probe.st

    def timed_iter(orig_iter):
        def __iter__(self):
            if not st["train"]:
                yield from orig_iter(self)
                return
            it = orig_iter(self)
            while st["batches"] < probe.limit:  # beyond the limit the epoch ends early; the script then evaluates
                t, c = time.perf_counter(), time.process_time()
                try:
                    out = next(it)
                except StopIteration:
                    return
                st["data_s"].append(time.perf_counter() - t)
                st["data_cpu_s"].append(time.process_time() - c)
                st["batches"] += 1
                probe.batch_arrived()
                yield out
        return __iter__

    return [(cls, "__iter__", timed_iter(cls.__iter__)) for cls in (data.TrainImages, data.FeatureViews)]


def evaluation_patches(probe: MethodProbe) -> list:
    """(object, attribute, replacement) for the evaluation side: images encoded, from the end of training
    (eval.save_prompt) to eval.write_results, and the time spent in eval.predict."""
    import eval as evaluation

    st = probe.st
    orig_conv, orig_save = torch.nn.Conv2d.forward, evaluation.save_prompt
    orig_protocol, orig_write, orig_predict = evaluation.evaluate_protocol, evaluation.write_results, evaluation.predict

    def counting_conv(self, x):
        if self.in_channels == 3:  # a ViT's patch embedding (or a ResNet's stem): one image per row
            st["encoded"] += x.shape[0]
        return orig_conv(self, x)

    def predict(fn, loader, *a, **k):  # image loading + encoding of one split
        t = time.perf_counter()
        out = orig_predict(fn, loader, *a, **k)
        probe.synchronize()
        st["predict_s"] += time.perf_counter() - t
        return out

    def save_prompt(*a, **k):
        out = orig_save(*a, **k)
        st["train"] = False
        st["train_end"], st["encoded"], st["predict_s"] = time.perf_counter(), 0, 0.0  # evaluation starts here
        return out

    def evaluate_protocol(train, targets, **kw):
        st["eval_images"] = len(train.val) + sum(len(split.test) for split in targets.values())
        st["eval_split_images"] = {"val": len(train.val), **{k: len(v.test) for k, v in targets.items()}}
        return orig_protocol(train, targets, **kw)

    def write_results(out_dir, **kw):
        st["eval_end"], st["eval_encoded"] = time.perf_counter(), st["encoded"]
        st["results"] = {"metrics": {k: v["raw"] for k, v in kw["metrics"].items()}, "timings": kw["timings"]}
        return orig_write(out_dir, **kw)

    return [(torch.nn.Conv2d, "forward", counting_conv), (evaluation, "save_prompt", save_prompt),
            (evaluation, "evaluate_protocol", evaluate_protocol), (evaluation, "write_results", write_results),
            (evaluation, "predict", predict)]


def run_patched(probe: MethodProbe, module, argv: list[str], patches: list) -> float:
    """module.main(argv) with the patches applied and probe.after_step as optimizer step post hook; the wall
    time. A memory run ends at StopBench; the host-device sync warnings go to probe.count_syncs."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, new)
    hook = register_optimizer_step_post_hook(probe.after_step)
    try:  # the patches are undone afterwards, so the worker can also run inside another process (tests)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            try:
                module.main(argv)
            except StopBench:
                pass
            wall = time.perf_counter() - t0
            recorded = [w for w in caught if "synchroniz" in str(w.message)]
    finally:
        hook.remove()
        probe.set_sync_mode(False)
        for obj, name, orig in originals:
            setattr(obj, name, orig)
    probe.count_syncs(recorded)
    return wall


def step_result(spec: dict, probe: MethodProbe, wall: float) -> dict:
    """The training side of a worker_method result: step and data times, memory, syncs (CUDA)."""
    st = probe.st
    post, post_cpu = st["post"], st["post_cpu"]
    intervals = [b - a for a, b in zip(post, post[1:])]  # step k = from the end of step k-1 to the end of step k
    cpu_intervals = [b - a for a, b in zip(post_cpu, post_cpu[1:])]  # the same in process CPU time (all threads)
    data_s = st["data_s"][1:len(post)]  # the fetch of batch k happens inside step k's interval
    data_cpu_s = st["data_cpu_s"][1:len(post)]
    out = {"method": spec["method"], "argv": spec["argv"], "mode": spec["mode"], "wall_s": wall,
           "steps_timed": len(intervals), "step_s": intervals, "data_s": data_s,
           "median_step_s": statistics.median(intervals) if intervals else None,
           "data_share": sum(data_s) / sum(intervals) if intervals else None,
           # CPU time: robust to other processes on a shared machine (with one thread, wall = CPU when idle)
           "step_cpu_s": cpu_intervals, "data_cpu_s": data_cpu_s,
           "median_step_cpu_s": statistics.median(cpu_intervals) if cpu_intervals else None,
           "data_share_cpu": sum(data_cpu_s) / sum(cpu_intervals) if cpu_intervals and sum(cpu_intervals) else None,
           "memory": st.get("memory")}
    if probe.sync_debug:
        out["syncs"] = st["syncs"]
    return out


def eval_result(st: dict) -> dict:
    """The evaluation side of a worker_method result; {} when the run did not get through evaluation."""
    if "eval_end" not in st or "train_end" not in st:
        return {}
    eval_s = st["eval_end"] - st["train_end"]
    return dict(eval_s=eval_s, eval_images=st["eval_images"], eval_split_images=st["eval_split_images"],
                eval_images_per_s=st["eval_images"] / eval_s, eval_encoded=st["eval_encoded"],
                predict_s=st["predict_s"], encode_images_per_s=st["eval_encoded"] / st["predict_s"],
                encodes_per_image=st["eval_encoded"] / st["eval_images"], results=st["results"])


def worker_method(spec: dict) -> dict:
    """Run one method's main(argv) in this process, timed from outside (module docstring)."""
    probe = MethodProbe(spec)
    patches = training_patches(probe) + evaluation_patches(probe)
    module = load_method(spec["method"])
    wall = run_patched(probe, module, spec["argv"], patches)
    out = step_result(spec, probe, wall)
    out.update(eval_result(probe.st))
    return out


def worker_cocoop_micro(spec: dict) -> dict:
    """CoCoOp's batched text encoder against the official per-image loop: same prompts, same logits."""
    import torch.nn.functional as F

    import clip

    cocoop = load_method("cocoop")
    device = torch.device(spec["device"])
    clip_model, _ = clip.load(spec["backbone"], device=device)
    amp = dict(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda")
    batch, repeats, rows = spec["batch"], spec["repeats"], []
    for n_cls in spec["classes"]:
        torch.manual_seed(0)
        args = cocoop.parse_args([])
        names = [f"synthetic object {i}" for i in range(n_cls)]
        model = cocoop.CustomCLIP(args, names, clip_model).to(device)
        # The official code's prompts: padded to the full context, not cut after the last EOT (clip.trim).
        with mock.patch.object(cocoop.clip, "trim", lambda tokens: tokens):
            official = cocoop.CustomCLIP(args, names, clip_model).to(device)
        official.load_state_dict(model.state_dict())
        for m in (model, official):
            for name, p in m.named_parameters():
                p.requires_grad_(name.startswith("prompt_learner."))
        feats = F.normalize(torch.randn(batch, clip_model.visual.output_dim, device=device), dim=-1)  # (B, E)
        labels = torch.arange(batch, device=device) % n_cls

        def batched():
            with torch.autocast(**amp):
                return model(feats)  # (B, C): one pass over all B x C prompts

        def looped():
            with torch.autocast(**amp):
                return torch.cat([model(feats[i:i + 1]) for i in range(batch)])  # (B, C): one pass per image

        def official_loop():
            with torch.autocast(**amp):
                return torch.cat([official(feats[i:i + 1]) for i in range(batch)])  # (B, C), 77-token prompts

        def run_once(fn, train: bool) -> tuple[float, float]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            if train:
                model.zero_grad(set_to_none=True)
                official.zero_grad(set_to_none=True)
                F.cross_entropy(fn(), labels).backward()
            else:
                with torch.no_grad():
                    fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t, time.process_time() - c

        with torch.no_grad():
            diff = max((batched() - fn()).abs().max().item() for fn in (looped, official_loop))
        row = {"classes": n_cls, "batch": batch, "prompt_tokens": int(model.prompt_learner.tokenized_prompts.shape[1]),
               "official_prompt_tokens": int(official.prompt_learner.tokenized_prompts.shape[1]),
               "max_abs_logit_diff": diff}
        for phase, train in (("forward", False), ("train_step", True)):
            times = {"batched": [], "looped": [], "official": []}
            for r in range(repeats + 1):  # alternated, so load changes on a shared machine hit all alike
                for name, fn in (("batched", batched), ("looped", looped), ("official", official_loop)):
                    t = run_once(fn, train)
                    if r:  # the first round warms up
                        times[name].append(t)
            for name in times:
                row[f"{phase}_{name}_s"] = statistics.median(t[0] for t in times[name])
                row[f"{phase}_{name}_cpu_s"] = statistics.median(t[1] for t in times[name])
            row[f"{phase}_speedup"] = row[f"{phase}_looped_s"] / row[f"{phase}_batched_s"]
            row[f"{phase}_speedup_cpu"] = row[f"{phase}_looped_cpu_s"] / row[f"{phase}_batched_cpu_s"]
            row[f"{phase}_speedup_official"] = row[f"{phase}_official_s"] / row[f"{phase}_batched_s"]
            row[f"{phase}_speedup_official_cpu"] = row[f"{phase}_official_cpu_s"] / row[f"{phase}_batched_cpu_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"rows": rows}


def worker_datapath(spec: dict) -> dict:
    """Training images/s at batch `batch`: data.TrainImages against the PIL loader it replaced (a DataLoader of
    data.train_transform over already decoded PIL images, `workers` worker processes), same smooth JPEGs."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    import data

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    folder = Path(spec["work"]) / f"datapath_{spec['width']}x{spec['height']}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    items = []
    for i in range(spec["images"]):
        path = folder / f"{i}.jpg"
        if not path.exists():
            coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
            coarse.resize((spec["width"], spec["height"]), Image.BICUBIC).save(path, quality=90)
        items.append(data.Datum(str(path), i % 10, f"c{i % 10}"))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def images_per_s(batches, n_batches: int) -> float:
        it = iter(batches)
        next(it)  # warm-up (and the DataLoader's worker start)
        sync()
        t = time.perf_counter()
        for _ in range(n_batches):
            x, _ = next(it)
            x = x.to(device, non_blocking=True)
        sync()
        return n_batches * spec["batch"] / (time.perf_counter() - t)

    class DecodedPIL(Dataset):  # the old path: ImageCache's decoded images, augmented by PIL per access
        def __init__(self):
            self.images, self.transform = [data.load_image(d.impath) for d in items], data.train_transform(224)

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.transform(self.images[i]), items[i].label

    n_batches = spec["images"] // spec["batch"] - 1
    workers = spec["workers"]
    pil = DataLoader(DecodedPIL(), batch_size=spec["batch"], shuffle=True, drop_last=True, num_workers=workers,
                     pin_memory=cuda, persistent_workers=workers > 0)
    t = time.perf_counter()
    new = data.TrainImages(items, 224, spec["batch"], device, seed=0, num_workers=workers)
    decode_s = time.perf_counter() - t
    out = {"device": str(device), "workers": workers, "images": len(items), "batch": spec["batch"],
           "size": [spec["width"], spec["height"]], "pil_images_per_s": images_per_s(pil, n_batches),
           "new_images_per_s": images_per_s(new, n_batches), "decode_images_per_s": len(items) / decode_s,
           "on_device": new.on_device}
    if spec.get("pixels"):
        import demo
        photos = [data.load_image(d.impath) for d in items[:32]]
        pictures = [Image.fromarray(demo.dataset_image(key, label, "train", i)) for key in demo.DEMO
                    for label in range(4) for i in range(4)]
        out["pixels"] = {"photos 500x375 -> 224, scale (0.08, 1)": pixel_difference(photos, 224, 0.08),
                         "demo pictures 32x32 -> 32, scale (0.5, 1)": pixel_difference(pictures, 32, 0.5)}
    return out


def pixel_difference(images: list, n_px: int, min_crop: float, draws: int = 4) -> dict:
    """Mean and max |difference| of the normalised pixels, data.TrainImages' resize (both kernels) against
    data.train_transform's PIL resize, on the same crop boxes (no flip)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    import data

    generator = torch.Generator().manual_seed(0)
    mean, std = torch.tensor(data.CLIP_MEAN).view(3, 1, 1), torch.tensor(data.CLIP_STD).view(3, 1, 1)
    diffs = {"uint8 kernel (CPU)": [], "float passes (CUDA)": []}
    for img in images:
        pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (3, H, W) uint8
        for _ in range(draws):
            top, left, h, w = data.crop_box(img.height, img.width, generator, (min_crop, 1.0))
            pil = TF.normalize(TF.to_tensor(TF.resized_crop(img, top, left, h, w, [n_px, n_px],
                                                            InterpolationMode.BICUBIC)), data.CLIP_MEAN, data.CLIP_STD)
            crop = pixels[:, top:top + h, left:left + w]
            for name, uint8_kernel in (("uint8 kernel (CPU)", True), ("float passes (CUDA)", False)):
                ours = (data.resize(crop, n_px, uint8_kernel=uint8_kernel) / 255 - mean) / std
                diffs[name].append((ours - pil).abs().flatten())
    return {name: {"mean_abs": torch.cat(d).mean().item(), "max_abs": torch.cat(d).max().item(),
                   "grey_levels_differing": (torch.cat(d) > 1e-3).float().mean().item()}
            for name, d in diffs.items()}


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = {"cocoop_micro": worker_cocoop_micro, "method": worker_method,
              "datapath": worker_datapath}[spec["kind"]](spec)
    result.update(torch_threads=torch.get_num_threads(), loadavg_end=os.getloadavg())
    Path(spec["result"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ parent side
class Bench:
    def __init__(self, opts: argparse.Namespace):
        self.opts = opts
        self.work = Path(opts.work).expanduser()
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        self.device = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.out = {"device": self.device_name(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(), "notes": []}

    def device_name(self) -> str:
        if self.device.startswith("cuda"):
            return torch.cuda.get_device_name(torch.device(self.device))
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        self.out["notes"].append(text)

    def worker(self, name: str, spec: dict, memory: bool = False) -> dict:
        """Run a worker subprocess (fresh process: isolated memory peaks and module state); its result dict,
        or {"error": ...} with the log's tail."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", CP_CACHE=str(self.work / "splits"))
        if self.device == "cpu":
            env.update(MEMORY_ENV if memory else TIMING_ENV)
            if memory:
                for k in TIMING_ENV:
                    if k not in MEMORY_ENV:
                        env.pop(k, None)
        log = self.work / "logs" / f"{name.replace(':', '_').replace('/', '_')}.log"
        with tempfile.TemporaryDirectory(dir=self.work) as tmp:
            spec = dict(spec, result=str(Path(tmp) / "result.json"), threads=self.opts.threads)
            (Path(tmp) / "spec.json").write_text(json.dumps(spec))
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            t = time.perf_counter()
            with open(log, "w") as f:
                proc = subprocess.run([sys.executable, __file__, "--worker", str(Path(tmp) / "spec.json")],
                                      stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            result_path = Path(spec["result"])
            if proc.returncode != 0 or not result_path.exists():
                tail = log.read_text()[-2000:]
                print(f"  FAILED (exit {proc.returncode}), log {log}:\n{tail}", flush=True)
                return {"error": f"exit {proc.returncode}", "log": str(log), "tail": tail}
            result = json.loads(result_path.read_text())
        result["worker_wall_s"] = time.perf_counter() - t
        print(f"  done in {result['worker_wall_s']:.0f}s (load average {os.getloadavg()[0]:.1f})", flush=True)
        return result

    def recipe(self, method: str) -> argparse.Namespace:
        return load_method(method).parse_args([])

    def method_argv(self, method: str, root: Path, key: str, shots: int, out: Path, extra=()) -> list[str]:
        return ["--dataset", key, "--root", str(root), "--shots", str(shots), "--backbone", str(self.backbone),
                "--output", str(out), "--device", self.device, "--epochs", "1", "--seed", "1", *extra]

    # -------------------------------------------------------------------------------- sections
    def train_job(self, method: str, extra=(), tag: str = "") -> dict:
        o = self.opts
        batch = self.recipe(method).batch_size
        base = math.ceil(o.classes / 2)
        shots = max(1, math.ceil((o.steps + 1) * batch / base))  # enough training images for steps + 1 batches
        root, key = self.train_data
        if shots > self.train_shots:
            raise SystemExit(f"internal: {method} needs {shots} shots, the dataset has {self.train_shots}")
        with tempfile.TemporaryDirectory(dir=self.work) as out:
            spec = {"kind": "method", "method": method, "mode": "train", "device": self.device, "steps": o.steps,
                    "sync_debug": self.device.startswith("cuda"),
                    "argv": self.method_argv(method, root, key, shots, Path(out), extra)}
            result = self.worker(f"train:{method}{tag}", spec)
        result.update(batch=batch, train_classes=base, shots=shots)
        return result

    def section_train(self) -> None:
        rows = self.out.setdefault("train", {})
        for m in self.methods:
            rows[m] = self.train_job(m)
            self.save()

    def section_cache(self) -> None:
        if "coop" not in self.all_methods:
            self.note("cache: methods/coop.py not found, skipped")
            return
        res = self.out.setdefault("cache", {})
        res["no_cache"] = self.train_job("coop", ["--image-cache-gb", "0"], ":cache0")
        default = self.out.get("train", {}).get("coop")
        res["default_cache"] = default if default and "error" not in default else self.train_job("coop")
        self.save()

    def section_data(self) -> None:
        """The training data path alone: on the CPU with 1 and 2 threads (the PIL loader with as many worker
        processes; 0 for one thread), on CUDA with data.default_workers' worker count."""
        res = self.out.setdefault("data", {"rows": {}})
        settings = [(1, 0), (2, 2)] if self.device == "cpu" else [(None, None)]
        for threads, workers in settings:
            if workers is None:
                import data
                workers = data.default_workers(self.device)
            spec = {"kind": "datapath", "device": self.device, "work": str(self.work), "batch": 32,
                    "images": 32 * (self.opts.data_batches + 1), "width": 500, "height": 375, "workers": workers,
                    "pixels": threads in (1, None)}
            name = f"data:{threads or 'default'}threads"
            saved, self.opts.threads = self.opts.threads, threads or self.opts.threads
            try:
                r = self.worker(name, spec)
            finally:
                self.opts.threads = saved
            res["rows"][name] = r
            self.save()

    def section_cocoop(self) -> None:
        if "cocoop" not in self.all_methods:
            self.note("cocoop: methods/cocoop.py not found, skipped")
            return
        spec = {"kind": "cocoop_micro", "device": self.device, "backbone": str(self.backbone), "batch": 4,
                "classes": self.opts.micro_classes, "repeats": self.opts.repeats}
        self.out["cocoop"] = self.worker("cocoop_micro", spec)
        self.save()

    def section_memory(self) -> None:
        o = self.opts
        todo = [m for m in MEMORY_METHODS if m in self.methods]
        if not todo:
            return
        root, key = dataset_for(self.work, 2 * o.memory_classes, (1, 1, 1), (64, 64))
        res = self.out.setdefault("memory", {"train_classes": o.memory_classes, "rows": {}})
        for m in todo:
            if not hasattr(self.recipe(m), "checkpoint_text"):
                self.note(f"memory: {m} has no --checkpoint-text option")
            for ckpt in (False, True):
                if ckpt and not hasattr(self.recipe(m), "checkpoint_text"):
                    continue
                batch = MEMORY_METHODS[m]
                extra = ["--batch-size", str(batch)] + (["--checkpoint-text"] if ckpt else [])
                with tempfile.TemporaryDirectory(dir=self.work) as out:
                    spec = {"kind": "method", "method": m, "mode": "memory", "device": self.device, "steps": 0,
                            "argv": self.method_argv(m, root, key, max(1, math.ceil(batch / o.memory_classes)),
                                                     Path(out), extra)}
                    r = self.worker(f"memory:{m}:{'ckpt' if ckpt else 'plain'}", spec, memory=True)
                r.update(batch=batch, checkpoint_text=ckpt)
                res["rows"][f"{m}{' --checkpoint-text' if ckpt else ''}"] = r
                self.save()

    def demo_world(self):
        if not (ROOT / "demo.py").exists():
            self.note("demo: demo.py not found; demo columns skipped")
            return None
        proc = subprocess.run([sys.executable, "demo.py", "prepare"], cwd=ROOT, capture_output=True, text=True)
        found = dict(line.split("=", 1) for line in proc.stdout.splitlines() if line.startswith("DEMO_"))
        if proc.returncode != 0 or not {"DEMO_ROOT", "DEMO_BACKBONE"} <= set(found):
            self.note(f"demo: `python demo.py prepare` failed (exit {proc.returncode}); demo columns skipped: "
                      f"{proc.stderr[-500:]}")
            return None
        return found["DEMO_ROOT"], found["DEMO_BACKBONE"]

    def run_script(self, name: str, method: str, argv: list[str]) -> dict:
        """One end-to-end run of a method script in a subprocess, as a user would: wall time and results."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", CP_CACHE=str(self.work / "splits"))
        if self.device == "cpu":
            env.update(TIMING_ENV)
        if self.opts.threads:
            env["OMP_NUM_THREADS"] = str(self.opts.threads)
        log = self.work / "logs" / f"{name.replace(':', '_')}.log"
        with tempfile.TemporaryDirectory(dir=self.work) as out:
            cmd = [sys.executable, f"methods/{method}.py", *argv, "--output", out, "--device", self.device]
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])}", flush=True)
            t, c = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            with open(log, "w") as f:
                proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
            wall, c2 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (c2.ru_utime + c2.ru_stime) - (c.ru_utime + c.ru_stime)  # CPU time of the whole run
            found = list(Path(out).rglob("results.json"))
            if proc.returncode != 0 or not found:
                print(f"  FAILED (exit {proc.returncode}), log {log}", flush=True)
                return {"error": f"exit {proc.returncode}", "log": str(log), "tail": log.read_text()[-1500:]}
            results = json.loads(found[0].read_text())
        print(f"  {wall:.0f}s (CPU time {cpu:.0f}s)", flush=True)
        return {"wall_s": wall, "cpu_s": cpu, "timings": results["timings"],
                "metrics": {k: v["raw"] for k, v in results["metrics"].items()},
                "command": " ".join(["python", cmd[1], *argv, "--device", self.device])}

    def section_demo(self) -> None:
        world = self.demo_world()
        if world is None:
            return
        demo_root, demo_backbone = world
        res = self.out.setdefault("demo", {"dataset": "demo_shapes", "epochs": self.opts.epochs, "rows": {}})
        for m in self.methods:
            res["rows"][m] = self.run_script(f"demo:{m}", m, ["--dataset", "demo_shapes", "--root", demo_root,
                                                              "--backbone", demo_backbone, "--seed", "1",
                                                              "--epochs", str(self.opts.epochs)])
            self.save()

    def section_featurecache(self) -> None:
        o = self.opts
        if not hasattr(self.recipe(o.fc_method), "feature_cache"):
            self.note(f"featurecache: {o.fc_method} has no --feature-cache option")
            return
        world = self.demo_world()
        if world is None:
            return
        demo_root, demo_backbone = world
        res = self.out.setdefault("featurecache", {"method": o.fc_method, "k": o.fc_k, "epochs": o.epochs,
                                                   "seeds": o.seeds, "runs": {}})
        for dataset in DEMO_DATASETS:
            for seed in o.seeds:
                for k in (0, o.fc_k):
                    name = f"fc:{o.fc_method}:{dataset}:seed{seed}:K{k}"
                    argv = ["--dataset", dataset, "--root", demo_root, "--backbone", demo_backbone, "--seed",
                            str(seed), "--epochs", str(o.epochs), "--feature-cache", str(k)]
                    res["runs"][name] = self.run_script(name, o.fc_method, argv)
                    self.save()

    # -------------------------------------------------------------------------------- output
    def save(self) -> None:
        if self.opts.out:
            tmp = Path(self.opts.out).with_suffix(".tmp")
            tmp.write_text(json.dumps(self.out, indent=1))
            os.replace(tmp, self.opts.out)

    def run(self) -> None:
        o = self.opts
        self.all_methods = discover_methods()
        self.methods = o.methods or self.all_methods
        unknown = sorted(set(self.methods) - set(self.all_methods))
        if unknown:
            raise SystemExit(f"error: no methods/{unknown[0]}.py (found: {', '.join(self.all_methods)})")
        self.out.update(methods=self.methods, options=vars(o))
        self.backbone = backbone_file(self.work)
        if {"train", "cache"} & set(o.sections):
            used = self.methods if "train" in o.sections else ["coop"]
            base = math.ceil(o.classes / 2)
            self.train_shots = max(math.ceil((o.steps + 1) * self.recipe(m).batch_size / base)
                                   for m in used if m in self.all_methods)
            self.train_data = dataset_for(self.work, o.classes, (self.train_shots, o.eval_per_class, o.eval_per_class),
                                          (500, 375))
        for section in SECTIONS:
            if section in o.sections:
                getattr(self, f"section_{section}")()
        self.out["loadavg_end"] = os.getloadavg()
        self.save()
        print()
        print(format_tables(self.out))


def _mb(x) -> str:
    return "-" if x is None else f"{x / 1024:.2f} GB" if x >= 1024 else f"{x:.0f} MB"


def _time_cell(r: dict, key: str, cpu: bool, digits: int = 2) -> str:
    """key ends in "_s"; on the CPU its CPU-time twin (ending in "_cpu_s") follows in brackets."""
    wall, cpu_key = f"{r[key]:.{digits}f} s", key[:-2] + "_cpu_s"
    return f"{wall} ({r[cpu_key]:.{digits}f} s)" if cpu and cpu_key in r else wall


def _share_cell(r: dict, cpu: bool) -> str:
    wall = f"{100 * r['data_share']:.1f}%"
    return f"{wall} ({100 * r['data_share_cpu']:.1f}%)" if cpu and r.get("data_share_cpu") is not None else wall


def _kind(cpu: bool) -> str:
    return " wall (CPU time)" if cpu else ""


def data_table(out: dict, cpu: bool) -> list[str]:
    """The data section: images/s of data.TrainImages against the PIL loader, then the pixel differences."""
    if not out.get("data", {}).get("rows"):
        return []
    lines = ["| training images, batch 32, 500x375 JPEGs to 224 | threads | PIL loader workers | PIL loader "
             "images/s | TrainImages images/s | speed-up | decoding once, images/s |", "|---|---|---|---|---|---|---|"]
    for name, r in out["data"]["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} (log {r.get('log')}) ||||||")
            continue
        where = r["device"] + ("" if r.get("on_device", True) else ", images in pinned host memory")
        lines.append(f"| {where} | {r.get('torch_threads')} | {r['workers']} | {r['pil_images_per_s']:.0f} | "
                     f"{r['new_images_per_s']:.0f} | {r['new_images_per_s'] / r['pil_images_per_s']:.1f}x | "
                     f"{r['decode_images_per_s']:.0f} |")
    lines.append("")
    pixels = next((r["pixels"] for r in out["data"]["rows"].values() if "pixels" in r), None)
    return lines + (pixel_table(pixels) if pixels else [])


def pixel_table(pixels: dict) -> list[str]:
    lines = ["| TrainImages against the PIL path, same crop boxes | resize | mean abs diff | max abs diff | "
             "pixels that differ |", "|---|---|---|---|---|"]
    for images, kernels in pixels.items():
        for kernel, d in kernels.items():
            lines.append(f"| {images} | {kernel} | {d['mean_abs']:.5f} | {d['max_abs']:.3f} | "
                         f"{100 * d['grey_levels_differing']:.1f}% |")
    return lines + ["Differences are of CLIP-normalised pixels (one grey level is about 0.015).", ""]


def train_table(out: dict, cpu: bool) -> list[str]:
    """The train section, one row per method, with the demo section's wall time of the method."""
    if not out.get("train"):
        return []
    demo, kind = out.get("demo", {}).get("rows", {}), _kind(cpu)
    lines = [f"| method | batch | train classes | step, median{kind} | data share{kind} | eval images/s "
             f"(encoding only) | enc/img | peak step memory | demo run{kind} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, r in out["train"].items():
        if "error" in r:
            lines.append(f"| {m} | failed: {r['error']} (log {r.get('log')}) |||||||")
            continue
        mem = (r.get("memory") or {}).get("growth_mb")
        d = demo.get(m, {})
        demo_cell = "-" if "wall_s" not in d else f"{d['wall_s']:.0f} s ({d['cpu_s']:.0f} s)" if cpu and "cpu_s" in d \
            else f"{d['wall_s']:.0f} s"
        lines.append(f"| {m} | {r['batch']} | {r['train_classes']} | {_time_cell(r, 'median_step_s', cpu)} | "
                     f"{_share_cell(r, cpu)} | "
                     f"{r.get('eval_images_per_s', 0):.1f} ({r.get('encode_images_per_s', 0):.1f}) | "
                     f"{r.get('encodes_per_image', float('nan')):.2f} | {_mb(mem)} | {demo_cell} |")
    return lines + [""]


def train_syncs(out: dict, cpu: bool) -> list[str]:
    """The host-device syncs the train section found (CUDA runs only)."""
    syncs = {m: r.get("syncs") for m, r in (out.get("train") or {}).items() if r.get("syncs") is not None}
    if not syncs:
        return []
    return (["Host-device syncs inside the timed training steps (set_sync_debug_mode):"]
            + [f"- {m}: {s or 'none'}" for m, s in syncs.items()] + [""])


def cache_table(out: dict, cpu: bool) -> list[str]:
    if not out.get("cache"):
        return []
    kind = _kind(cpu)
    lines = [f"| CoOp, batch 32 | step, median{kind} | data time per step{kind} | data share{kind} |",
             "|---|---|---|---|"]
    for name, label in (("no_cache", "--image-cache-gb 0 (images in host memory)"),
                        ("default_cache", "default (2 GB: images on the training device)")):
        r = dict(out["cache"].get(name) or {})
        if r.get("median_step_s") is not None:
            r["data_median_s"] = statistics.median(r["data_s"])
            r["data_median_cpu_s"] = statistics.median(r.get("data_cpu_s") or [float("nan")])
            lines.append(f"| {label} | {_time_cell(r, 'median_step_s', cpu)} | "
                         f"{_time_cell(r, 'data_median_s', cpu, 3)} | {_share_cell(r, cpu)} |")
    return lines + [""]


def cocoop_table(out: dict, cpu: bool) -> list[str]:
    if not out.get("cocoop", {}).get("rows"):
        return []
    kind = _kind(cpu)
    lines = [f"| CoCoOp text side, batch 4 | classes | batched{kind} | per-image loop{kind} | official loop, "
             f"77 tokens{kind} | speed-up vs loop | speed-up vs official | max logit diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out["cocoop"]["rows"]:
        for phase in ("forward", "train_step"):
            ups = []
            for suffix in ("", "_official"):
                up = f"{r[f'{phase}_speedup{suffix}']:.2f}x"
                if cpu and f"{phase}_speedup{suffix}_cpu" in r:
                    up += f" ({r[f'{phase}_speedup{suffix}_cpu']:.2f}x)"
                ups.append(up)
            lines.append(f"| {phase.replace('_', ' ')} | {r['classes']} | {_time_cell(r, f'{phase}_batched_s', cpu)} | "
                         f"{_time_cell(r, f'{phase}_looped_s', cpu)} | {_time_cell(r, f'{phase}_official_s', cpu)} | "
                         f"{ups[0]} | {ups[1]} | {r['max_abs_logit_diff']:.1e} |")
    return lines + [""]


def memory_table(out: dict, cpu: bool) -> list[str]:
    if not out.get("memory", {}).get("rows"):
        return []
    n = out["memory"]["train_classes"]
    lines = [f"| training step memory | batch | at {n} classes | scaled to 1000 classes (x{1000 / n:g}) |",
             "|---|---|---|---|"]
    for name, r in out["memory"]["rows"].items():
        g = (r.get("memory") or {}).get("growth_mb")
        lines.append(f"| {name} | {r.get('batch')} | {_mb(g)} | {_mb(None if g is None else g * 1000 / n)} |")
    return lines + [""]


def featurecache_table(out: dict, cpu: bool) -> list[str]:
    """The featurecache section: per demo dataset, mean ± sd over seeds with the cache off and on, then the
    per-seed differences."""
    if not out.get("featurecache", {}).get("runs"):
        return []
    fc = out["featurecache"]
    lines = [f"| {fc['method']}, {fc['epochs']} epochs, mean ± sd over seeds {fc['seeds']} | feature cache | "
             "training time (wall) | whole run, CPU time | base acc | novel acc | base ECE | novel ECE |",
             "|---|---|---|---|---|---|---|---|"]
    for dataset in DEMO_DATASETS:
        for k in (0, fc["k"]):
            lines += _featurecache_mean_row(fc, dataset, k)
        lines += _featurecache_diff_row(fc, dataset)
    return lines + [""]


def _featurecache_mean_row(fc: dict, dataset: str, k: int) -> list[str]:
    runs = [r for name, r in fc["runs"].items() if f":{dataset}:" in name and name.endswith(f":K{k}")
            and "error" not in r]
    if not runs:
        return []

    def stat(f, unit=""):
        values = [f(r) for r in runs]
        if any(math.isnan(v) for v in values):
            return "-"
        sd = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.2f}{unit}{sd}"

    return [f"| {dataset} | {'off' if k == 0 else f'K={k}'} | "
            f"{stat(lambda r: r['timings']['train_s'], ' s')} | "
            f"{stat(lambda r: r.get('cpu_s', float('nan')), ' s')} | "
            f"{stat(lambda r: r['metrics']['base']['acc'])} | "
            f"{stat(lambda r: r['metrics']['novel']['acc'])} | "
            f"{stat(lambda r: r['metrics']['base']['ece'])} | "
            f"{stat(lambda r: r['metrics']['novel']['ece'])} |"]


def _featurecache_diff_row(fc: dict, dataset: str) -> list[str]:
    pairs = [(fc["runs"].get(f"fc:{fc['method']}:{dataset}:seed{seed}:K0"),
              fc["runs"].get(f"fc:{fc['method']}:{dataset}:seed{seed}:K{fc['k']}")) for seed in fc["seeds"]]
    pairs = [(a, b) for a, b in pairs if a and b and "error" not in a and "error" not in b]
    if not pairs:
        return []

    def diff(split, metric):
        d = [b["metrics"][split][metric] - a["metrics"][split][metric] for a, b in pairs]
        return f"{statistics.mean(d):+.2f} (" + ", ".join(f"{x:+.1f}" for x in d) + ")"

    speed = statistics.mean(a["timings"]["train_s"] / b["timings"]["train_s"] for a, b in pairs)
    return [f"| {dataset} | K={fc['k']} minus off, per seed | {speed:.1f}x faster | | "
            f"{diff('base', 'acc')} | {diff('novel', 'acc')} | {diff('base', 'ece')} | {diff('novel', 'ece')} |"]


def notes_lines(out: dict, cpu: bool) -> list[str]:
    return ["Notes:"] + [f"- {n}" for n in out["notes"]] if out.get("notes") else []


TABLES = (data_table, train_table, train_syncs, cache_table, cocoop_table, memory_table, featurecache_table,
          notes_lines)  # format_tables' order


def format_tables(out: dict) -> str:
    """Markdown tables of a bench.json dict. On the CPU, times read "wall (process CPU time)": the CPU time
    hardly moves when other processes share the cores, the wall time does."""
    cpu = out["device"].startswith("CPU")
    lines = [f"Device: {out['device']}; torch {out['torch']}; command: `{out['command']}`", ""]
    for table in TABLES:
        lines += table(out, cpu)
    return "\n".join(lines)


def _help_formatter() -> type:
    """The module docstring as written, and each option's default stated once (eval.ArgumentParser's rule)."""
    import eval as evaluation

    return type("Help", (argparse.RawDescriptionHelpFormatter, evaluation.ArgumentParser.Formatter), {})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=_help_formatter())
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=None,
                   help="comma-separated method names (default: every methods/*.py except zeroshot)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda[:N]")
    p.add_argument("--sections", type=lambda s: [x for x in s.split(",") if x],
                   default=[s for s in SECTIONS if s != "featurecache"],
                   help=f"comma-separated, any of {', '.join(SECTIONS)} (default: all but featurecache)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per method, after one warm-up step "
                                                           "(default: 20 on CUDA, 3 on the CPU)")
    p.add_argument("--epochs", type=int, default=20, help="epochs of the demo runs (run.sh's demo setting)")
    p.add_argument("--classes", type=int, default=None,
                   help="classes of the synthetic dataset; base-to-novel training uses the first half "
                        "(default: 100 on CUDA, 10 on the CPU)")
    p.add_argument("--eval-per-class", type=int, default=4,
                   help="val and test images per class of the synthetic dataset (the few-shot val keeps up to 4)")
    p.add_argument("--data-batches", type=int, default=8, help="timed batches of the data section")
    p.add_argument("--memory-classes", type=int, default=250, help="training classes of the memory section")
    p.add_argument("--micro-classes", type=lambda s: [int(x) for x in s.split(",")], default=[10, 50],
                   help="comma-separated class counts of the CoCoOp microbenchmark (default: 10,50)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of the CoCoOp microbenchmark")
    p.add_argument("--fc-method", default="coop", help="method of the featurecache section")
    p.add_argument("--fc-k", type=int, default=4, help="K of the featurecache section")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3],
                   help="comma-separated seeds of the featurecache section (default: 1,2,3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers (default: torch's)")
    p.add_argument("--quick", action="store_true",
                   help="small and short: 10 classes, 2 timed steps, 50 memory classes, 2 demo epochs, 2 repeats")
    p.add_argument("--work", default=os.path.join("~", ".cache", "calibrated-prompts", "bench"),
                   help="cache of the random weights, synthetic datasets and logs")
    p.add_argument("--out", default="bench.json", help="JSON results ('' = none)")
    p.add_argument("--table", nargs="+", metavar="JSON",
                   help="only print the tables of earlier --out files (merged, later files' sections win)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    o = p.parse_args(argv)
    if o.quick:
        o.classes, o.memory_classes, o.epochs, o.repeats, o.data_batches = 10, 50, 2, 2, 2
        o.steps = o.steps or 2
    on_cuda = o.device.startswith("cuda") or (o.device == "auto" and torch.cuda.is_available())
    if o.steps is None:
        o.steps = 20 if on_cuda else 3
    if o.classes is None:
        o.classes = 100 if on_cuda else 10
    bad = sorted(set(o.sections) - set(SECTIONS))
    if bad:
        p.error(f"unknown section {bad[0]!r}; choose from {', '.join(SECTIONS)}")
    if o.steps < 1 or o.classes < 2 or o.memory_classes < 1:
        p.error("--steps must be >= 1, --classes >= 2 and --memory-classes >= 1")
    return o


def main(argv=None) -> None:
    o = parse_args(argv)
    if o.worker:
        worker_main(o.worker)
        return
    if o.table:
        merged = {}
        for path in o.table:
            merged.update(json.loads(Path(path).read_text()))
        print(format_tables(merged))
        return
    Bench(o).run()


if __name__ == "__main__":
    main()
