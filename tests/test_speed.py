"""Checkable claims of the README's "Speed" section (the timings themselves come from tests/bench.py, which
pytest does not collect; BENCHMARKS.md keeps the measurements).

- Evaluation encodes each image once per split per run, for every method script, however many post-hoc
  variants (raw, TS, DAC) are computed from it.
- --checkpoint-text leaves the gradients unchanged (and really recomputes the text blocks in backward).
- No operation that synchronises host and device on CUDA runs inside a training step (traced on the CPU).
- The speed options exist where they apply: --checkpoint-text and the decoded-image cache in every method,
  --feature-cache (off by default) in the methods whose image encoder is frozen.
- The benchmark's instrumentation still works on the current scripts (a short in-process worker run).
"""
import os
import sys
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import TorchDispatchMode

import clip
import data
import eval as evaluation
from conftest import EUROSAT_CLASSES, ROOT
from test_coop import load_method

METHODS = sorted(p.stem for p in (ROOT / "methods").glob("*.py") if not p.stem.startswith("_"))
FROZEN_IMAGE_ENCODER = {"coop", "cocoop", "kgcoop", "prograd", "proda"}  # these have --feature-cache


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", METHODS)
def test_evaluation_encodes_each_image_once(method, tiny_world, tmp_path, monkeypatch, one_thread):
    """Count the images entering any 3-channel Conv2d (the ViT patch embedding: every image encoder, prompted,
    frozen or teacher, goes through one) after training ends, up to the results: val + every test split.
    Also count the class lists the prompt learner is built for: once per list (base, novel), however often
    evaluation asks for a list's features (CoCoOp rebuilds per call: its logits are conditioned per image)."""
    root, ckpt, cache = tiny_world
    monkeypatch.setenv("CP_CACHE", str(cache))
    count = {"images": 0, "class_lists": 0}
    conv_forward = torch.nn.Conv2d.forward
    module = load_method(method)

    def counting_forward(self, x):
        if self.in_channels == 3:
            count["images"] += x.shape[0]
        return conv_forward(self, x)

    save_prompt, write_results, encoded = evaluation.save_prompt, evaluation.write_results, []

    def save_and_reset(*args, **kwargs):  # the end of training: only evaluation is counted from here
        out = save_prompt(*args, **kwargs)
        count["images"] = count["class_lists"] = 0
        return out

    def record_and_write(out_dir, **kwargs):
        encoded.append((count["images"], count["class_lists"]))
        return write_results(out_dir, **kwargs)

    learners = {c for c in vars(module).values() if isinstance(c, type) and "set_classnames" in vars(c)}
    assert len(learners) == (method != "zeroshot")  # PromptLearner (VLPromptLearner in PromptSRC)
    for learner in learners:
        set_classnames = learner.set_classnames

        def counting_set_classnames(self, *args, **kwargs):
            count["class_lists"] += 1
            return set_classnames(self, *args, **kwargs)

        monkeypatch.setattr(learner, "set_classnames", counting_set_classnames)
    if method == "zeroshot":  # no prompt learner: count the class lists its own code sends to the text encoder
        text_features = evaluation.text_features

        def counting_text_features(*args, **kwargs):
            count["class_lists"] += sys._getframe(1).f_code.co_filename.endswith("zeroshot.py")
            return text_features(*args, **kwargs)

        monkeypatch.setattr(evaluation, "text_features", counting_text_features)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", counting_forward)
    monkeypatch.setattr(evaluation, "save_prompt", save_and_reset)
    monkeypatch.setattr(evaluation, "write_results", record_and_write)
    monkeypatch.setattr(evaluation, "reliability_diagram", lambda *a, **k: None)  # plots are not counted; saves time
    argv = ["--dataset", "eurosat", "--shots", "4", "--device", "cpu", "--root", str(root), "--backbone", str(ckpt),
            "--output", str(tmp_path), "--epochs", "1"]
    if method != "zeroshot":
        argv += ["--batch-size", "4"]
    module.main(argv)

    train, targets = data.protocol_splits("base2new", "eurosat", root, 4, 1, cache_dir=cache)
    expected = len(train.val) + sum(len(split.test) for split in targets.values())
    assert expected == 10 + 15 + 15  # 2 val and 3 test images per class, 5 base and 5 novel classes
    lists = {"cocoop": 5}.get(method, 2)  # CoCoOp: val, base and novel logits + base, novel for DAC
    assert encoded == [(expected, lists)]


def _syncing(func, args, kwargs) -> bool:
    """Whether an aten op makes the host wait for a CUDA device: it reads a value back (item(), bool(), float()),
    or its output size depends on the data (nonzero, boolean-mask indexing, unique, ...)."""
    name = func._schema.name.split("::")[-1]
    if name in ("_local_scalar_dense", "nonzero", "argwhere", "masked_select", "unique_consecutive", "_unique",
                "_unique2", "unique_dim", "bincount", "equal", "allclose", "is_nonzero"):
        return True
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None and isinstance(args[-1] if len(args) > 1 else None, torch.Tensor)
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1])
    return False


class SyncRecorder(TorchDispatchMode):
    """Records syncing ops (with the repository source line that issued them) while state["in_step"] is set."""

    def __init__(self, state):
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.state["in_step"] and _syncing(func, args, kwargs):
            frames = [f for f in traceback.extract_stack()[:-1]
                      if f.filename.startswith(str(ROOT)) and not f.filename.endswith("test_speed.py")]
            where = f"{os.path.relpath(frames[-1].filename, ROOT)}:{frames[-1].lineno}" if frames else "?"
            self.state["found"].append(f"{func} at {where}")
        return func(*args, **kwargs)


def test_sync_recorder_flags_syncing_ops():
    state = {"in_step": True, "found": []}
    x = torch.randn(4, 4, requires_grad=True)
    with SyncRecorder(state):
        x[x > 0].sum().backward()  # boolean-mask indexing: nonzero() forward (index) and backward (index_put)
        x.detach().sum().item()  # a read-back
        x.masked_fill(x > 0, 0).sum()  # same shape whatever the data: no sync
        state["in_step"] = False
        x.detach().sum().item()  # outside a step: not recorded
    assert [f.split(" at ")[0] for f in state["found"]] == \
        ["aten.index.Tensor", "aten.index_put.default", "aten._local_scalar_dense.default"]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "zeroshot"])
def test_training_step_has_no_host_sync(method, tiny_world, tmp_path, monkeypatch, one_thread):
    """Every aten op between a training batch's arrival and the end of its optimizer step, forward and backward,
    is checked for ops that synchronise on CUDA. The CPU cannot show device-to-host copies (.cpu(), .tolist(),
    .numpy() of a CPU tensor dispatch nothing); tests/bench.py checks those with set_sync_debug_mode on CUDA."""
    root, ckpt, cache = tiny_world
    monkeypatch.setenv("CP_CACHE", str(cache))
    state = {"in_step": False, "steps": 0, "batches": 0, "found": []}
    batches = data.TrainImages.__iter__

    def training_batches(self):
        for batch in batches(self):  # the batch is made before the step starts
            state["in_step"] = True
            state["batches"] += 1
            yield batch

    def step_done(*_):
        state["in_step"] = False
        state["steps"] += 1

    monkeypatch.setattr(data.TrainImages, "__iter__", training_batches)
    monkeypatch.setattr(evaluation, "reliability_diagram", lambda *a, **k: None)
    handle = register_optimizer_step_post_hook(step_done)
    try:
        with SyncRecorder(state):
            load_method(method).main(["--dataset", "eurosat", "--shots", "4", "--batch-size", "4", "--device", "cpu",
                                      "--root", str(root), "--backbone", str(ckpt), "--output", str(tmp_path),
                                      "--epochs", "1"])
    finally:
        handle.remove()
    assert state["steps"] == state["batches"] == 5  # 5 base classes x 4 shots / batch 4, every step watched
    assert state["found"] == []


def _tiny_clip():
    torch.manual_seed(0)
    return clip.tiny_clip(context_length=32).eval()


def _block_calls(clip_model, run) -> int:
    """How many times the text transformer's blocks start during run() (a pre-hook: checkpointing stops the
    recomputation early, so post-hooks miss it)."""
    calls = []
    hooks = [b.register_forward_pre_hook(lambda *a: calls.append(1)) for b in clip_model.transformer.resblocks]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return len(calls)


def _grads(module_name: str, extra: list[str], forward) -> tuple[dict, int]:
    """Gradients of the prompt learner's parameters for one loss, with the text blocks' call count."""
    method = load_method(module_name)
    clip_model = _tiny_clip()
    torch.manual_seed(1)  # same initial prompts for both runs
    model = method.CustomCLIP(method.parse_args(extra), EUROSAT_CLASSES[:5], clip_model)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("prompt_learner."))
    g = torch.Generator().manual_seed(2)
    features = F.normalize(torch.randn(3, clip_model.visual.output_dim, generator=g), dim=-1)  # (B, E)
    labels = torch.tensor([0, 3, 4])
    calls = _block_calls(clip_model, lambda: F.cross_entropy(forward(model, features), labels).backward())
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, calls


def test_coop_checkpoint_text_same_gradients():
    plain, plain_calls = _grads("coop", [], lambda model, f: model(f))
    ckpt, ckpt_calls = _grads("coop", ["--checkpoint-text"], lambda model, f: model(f))
    assert plain_calls == 2 and ckpt_calls == 4  # 2 blocks; checkpointed ones run again in backward
    assert set(plain) == set(ckpt) == {"prompt_learner.ctx"}
    assert plain["prompt_learner.ctx"].abs().sum() > 0
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-9)


def test_cocoop_checkpoint_text_same_gradients_across_chunks():
    # 3 images x 5 classes = 15 prompts in chunks of 4: 4 encoder passes of 2 blocks each
    plain, plain_calls = _grads("cocoop", ["--chunk-size", "4"], lambda model, f: model(f))
    ckpt, ckpt_calls = _grads("cocoop", ["--chunk-size", "4", "--checkpoint-text"], lambda model, f: model(f))
    assert plain_calls == 8 and ckpt_calls == 16
    assert set(plain) == set(ckpt) and {"prompt_learner.ctx", "prompt_learner.meta_net.linear1.weight"} <= set(plain)
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "zeroshot"])
def test_speed_options_exist(method):
    args = load_method(method).parse_args(["--checkpoint-text"])
    assert args.checkpoint_text is True and args.image_cache_gb > 0  # decoded-image cache on by default
    if method in FROZEN_IMAGE_ENCODER:
        assert load_method(method).parse_args(["--feature-cache", "3"]).feature_cache == 3
        assert args.feature_cache == 0  # opt-in: a deviation from the protocol


def test_bench_worker_times_a_method(tiny_world, tmp_path, monkeypatch, one_thread):
    """tests/bench.py's instrumentation on the current coop.py: steps, data time, evaluation count, memory; and
    every patch undone afterwards."""
    import bench

    root, ckpt, cache = tiny_world
    monkeypatch.setenv("CP_CACHE", str(cache))
    monkeypatch.setattr(evaluation, "reliability_diagram", lambda *a, **k: None)

    def patched():  # everything the worker patches
        return (data.TrainImages.__iter__, data.FeatureViews.__iter__, torch.nn.Conv2d.forward, evaluation.predict,
                evaluation.save_prompt, evaluation.evaluate_protocol, evaluation.write_results)

    before = patched()
    r = bench.worker_method({"kind": "method", "method": "coop", "mode": "train", "device": "cpu", "steps": 2,
                             "argv": ["--dataset", "eurosat", "--root", str(root), "--shots", "4", "--batch-size", "4",
                                      "--backbone", str(ckpt), "--output", str(tmp_path), "--device", "cpu",
                                      "--epochs", "1"]})
    assert patched() == before
    assert r["steps_timed"] == 2 and len(r["data_s"]) == 2 and 0 < r["data_share"] < 1  # loader cut after 3 batches
    assert r["eval_images"] == 40 and r["encodes_per_image"] == 1.0 and r["eval_images_per_s"] > 0
    assert r["memory"]["kind"] == "cpu_peak_rss" and r["memory"]["growth_mb"] >= 0
    assert set(r["results"]["metrics"]) == {"base", "novel"}  # evaluation ran to the end
