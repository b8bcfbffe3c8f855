"""demo.py: the world is deterministic, the datasets have CoOp's layout, the tiny CLIP transfers zero-shot.

The end-to-end tests use the shipped tiny CLIP and the demo datasets, unpacked and written into the cache
(under $CP_DEMO_DIR or ~/.cache/calibrated-prompts/demo) on first use.
"""
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import demo
import eval as evaluation

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root() -> Path:
    return demo.write_datasets()


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return demo.backbone()


def test_world_is_deterministic_per_seed():
    images, texts, pos = demo.world_batch(seed=7, step=3, size=24)
    images2, texts2, pos2 = demo.world_batch(seed=7, step=3, size=24)
    np.testing.assert_array_equal(images, images2)
    assert texts == texts2 and (pos == pos2).all()
    assert images.shape == (24, demo.RES, demo.RES, 3) and images.dtype == np.uint8
    other, other_texts, _ = demo.world_batch(seed=8, step=3, size=24)
    assert not np.array_equal(images, other) and texts != other_texts
    assert len(set(texts)) > 12  # varied captions


def test_caption_positives_follow_the_claims():
    rng = np.random.default_rng(0)
    specs = [demo.sample_spec(rng, kind="object", shape="circle", colour="red"),
             demo.sample_spec(rng, kind="object", shape="circle", colour="grey"),
             demo.sample_spec(rng, kind="object", shape="star", colour="red"),
             demo.sample_spec(rng, kind="pattern", texture="striped", colours=("red", "blue"))]
    claims = [{"kind": "object", "shape": "circle"}, {"kind": "object", "shape": "circle", "colour": "red"},
              {"colour": "red"}, {"texture": "striped", "colours": frozenset({"blue", "red"})}]
    expected = [[1, 1, 1, 0],
                [1, 0, 0, 0],
                [0, 0, 1, 0],
                [0, 0, 0, 1]]
    np.testing.assert_array_equal(demo.positives(specs, claims), np.array(expected, bool))
    # Every generated caption is true of its own image.
    _, _, pos = demo.world_batch(seed=0, step=0, size=64)
    assert pos.diagonal().all()


def test_pretraining_is_deterministic_and_restores_torch_settings(tmp_path):
    threads = torch.get_num_threads()
    a = demo.pretrain(seed=1, steps=2, log=lambda m: None)
    b = demo.pretrain(seed=1, steps=2, log=lambda m: None)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    emb = a["token_embedding.weight"]  # untrained rows (tokens absent from two batches of captions) are zero
    assert 10 < emb.ne(0).any(dim=1).sum() < 1000 and emb[0].eq(0).all()
    demo.save_state(a, tmp_path / "a.pt")
    model, _ = clip.load(str(tmp_path / "a.pt"), device="cpu")
    assert model.context_length == demo.MODEL_SIZES["context_length"]
    assert model.visual.input_resolution == demo.RES and hasattr(model.visual, "class_embedding")  # a ViT


def _pretrain_in_subprocess(out: Path, threads: int) -> list[str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, str(REPO / "demo.py"), "pretrain", "--steps", "3", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


def test_pretraining_gives_the_same_file_whatever_the_thread_settings(tmp_path):
    """`python demo.py pretrain` under one and two threads, and pretrain() inside this test process (whatever
    pytest and the earlier tests left set), give the same weights, and the files the same bytes."""
    one = _pretrain_in_subprocess(tmp_path / "one.pt", 1)
    two = _pretrain_in_subprocess(tmp_path / "two.pt", 2)
    assert one[0] == two[0] and one[0].startswith("weights sha256 ")
    assert (tmp_path / "one.pt").read_bytes() == (tmp_path / "two.pt").read_bytes()
    assert one[1].split("sha256 ")[1] == two[1].split("sha256 ")[1]
    torch.set_num_threads(2)
    try:
        here = demo.pretrain(steps=3, log=lambda m: None)
    finally:
        torch.set_num_threads(1)
    assert one[0] == f"weights sha256 {demo.state_sha256(here)}"
    demo.save_state(demo.pack(here), tmp_path / "here.pt")
    assert (tmp_path / "here.pt").read_bytes() == (tmp_path / "one.pt").read_bytes()


def test_the_shipped_checkpoint(tmp_path, monkeypatch, capsys):
    """The shipped file has the expected hash, unpacks to a model clip.load reads, and packs back to the same
    bytes; a damaged or missing file is refused with one clear line."""
    raw = demo.SHIPPED.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == demo.SHIPPED_SHA256 and len(raw) < 2_000_000
    state = demo.read_shipped()
    assert all(v.dtype == torch.float32 for v in state.values())
    assert state["token_embedding.weight"].shape == (49408, demo.MODEL_SIZES["transformer_width"])
    assert math.isclose(state["logit_scale"].exp().item(), 100, rel_tol=1e-6)
    demo.save_state(demo.pack(state), tmp_path / "again.pt")
    assert (tmp_path / "again.pt").read_bytes() == raw  # unpack loses nothing that pack kept
    monkeypatch.setenv("CP_DEMO_DIR", str(tmp_path / "cache"))
    path = demo.backbone()
    assert path.parent == tmp_path / "cache" and demo.SHIPPED_SHA256[:12] in path.name
    model, _ = clip.load(str(path), device="cpu")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k].float(), state[k]) for k in state)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(raw[:-10] + bytes(10))
    with pytest.raises(demo.ShippedCheckpointError, match="damaged.pt has sha256 .* demo.py expects"):
        demo.read_shipped(damaged)
    monkeypatch.setenv("CP_DEMO_DIR", str(tmp_path / "cache2"))  # no unpacked copy yet
    monkeypatch.setattr(demo, "SHIPPED", tmp_path / "missing.pt")
    with pytest.raises(SystemExit) as e, evaluation.user_errors():  # as `python demo.py prepare` runs it
        demo.main(["prepare"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: cannot read the demo's tiny CLIP") and "missing.pt" in err
    assert err.count("\n") == 1 and "git checkout" in err


def test_datasets_have_the_split_file_layout(root):
    for key, (name, _, classes) in demo.DEMO.items():
        split = json.loads((root / key / f"split_zhou_{name}.json").read_text())
        assert set(split) == {"train", "val", "test"}
        labels = sorted({e[1] for e in split["train"]})
        assert labels == list(range(len(classes))) and len(labels) >= 10
        for s, n in demo.SPLIT_SIZES.items():
            counts = np.bincount([e[1] for e in split[s]], minlength=len(labels))
            assert (counts == n).all(), (key, s)
        assert demo.SPLIT_SIZES["train"] >= 16 and demo.SPLIT_SIZES["val"] >= 4 and demo.SPLIT_SIZES["test"] >= 30
        for path, label, classname in split["train"][:: len(split["train"]) // 5]:
            assert classname == classes[label][0].replace(" ", "_") and path.startswith(classname + "/")
            image = Image.open(root / key / "images" / path)
            assert image.mode == "RGB" and image.size == (demo.RES, demo.RES)
        # The files hold exactly what the (pure) generator draws: the datasets are deterministic.
        path, label, _ = split["test"][-1]
        i = int(Path(path).stem.split("_")[1])
        np.testing.assert_array_equal(np.asarray(Image.open(root / key / "images" / path)),
                                      demo.dataset_image(key, label, "test", i))


def test_zero_shot_beats_chance_three_times_on_base_and_novel(root, checkpoint):
    rows = demo.zeroshot(root, checkpoint)
    print(demo.format_zeroshot(rows))
    assert [r["dataset"] for r in rows] == list(demo.DEMO)
    for r in rows:
        assert r["novel_classes"] >= 5 and r["base_classes"] >= 5
        assert r["novel_acc"] >= 3 * r["novel_chance"], r
        assert r["base_acc"] >= 3 * r["base_chance"], r


def test_linear_probe_starts_at_zero_shot(root, checkpoint):
    """With no fitting steps the probe is the zero-shot classifier, so it must reproduce zero-shot's base
    accuracy exactly; fitted, it stays a percentage."""
    zero_shot = {r["dataset"]: r["base_acc"] for r in demo.zeroshot(root, checkpoint)}
    assert demo.linear_probe(root, checkpoint, steps=0) == pytest.approx(zero_shot, abs=1e-9)
    fitted = demo.linear_probe(root, checkpoint, steps=20)
    assert fitted.keys() == zero_shot.keys() and all(0 <= v <= 100 for v in fitted.values())


def test_prepare_prints_only_shell_assignments(root, checkpoint):
    out = subprocess.run([sys.executable, str(REPO / "demo.py"), "prepare"], capture_output=True, text=True,
                         check=True, cwd=REPO, env=dict(os.environ)).stdout
    assert out.splitlines() == [f"DEMO_ROOT={root}", f"DEMO_BACKBONE={checkpoint}"]


def test_prompt_tuning_runs_and_learns_in_the_demo_world(root, checkpoint, tmp_path):
    """20 epochs of CoOp (run.sh's demo setting) on demo_colours, seeds 1-3, beside zero-shot CLIP. Asserted is
    only what holds by a margin wider than the spread measured across environments (BENCHMARKS.md, "The
    demo world across seeds and machines"): every run completes, the training loss falls, CoOp stays within MARGIN points of zero-shot on the
    base classes and far above chance on the novel ones. That CoOp beats zero-shot is not asserted: it does
    here by under three points, and a claim about the toy that holds by a point or two is no test."""
    common = ["--dataset", "demo_colours", "--root", str(root), "--backbone", str(checkpoint),
              "--output", str(tmp_path), "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CP_CACHE=str(tmp_path / "splits"))
    runs = [("zeroshot", 1, [])] + [("coop", seed, ["--epochs", "20"]) for seed in (1, 2, 3)]
    losses = {}
    for method, seed, extra in runs:
        proc = subprocess.run([sys.executable, str(REPO / "methods" / f"{method}.py"), *common, "--seed", str(seed),
                               *extra], check=True, cwd=REPO, env=env, capture_output=True, text=True)
        losses[seed] = [float(line.split("loss ")[1].split()[0]) for line in proc.stdout.splitlines()
                        if line.startswith("epoch ")]
    metrics = {(m, seed): json.loads((tmp_path / "base2new" / m / "none" / "demo_colours" / f"seed{seed}" /
                                      "results.json").read_text())["metrics"] for m, seed, _ in runs}
    for seed in (1, 2, 3):
        assert len(losses[seed]) == 20, losses[seed]
        assert metrics["coop", seed]["novel"]["raw"]["acc"] >= 5 * 10, metrics["coop", seed]["novel"]["raw"]
    # An epoch is 5 batches, so its loss is noisy (sd about 0.04 around 0.55): compare the first and the last
    # five epochs pooled over the seeds (measured 0.596 -> 0.540, about four times the noise of the difference).
    early = sum(sum(losses[seed][:5]) for seed in (1, 2, 3)) / 15
    late = sum(sum(losses[seed][-5:]) for seed in (1, 2, 3)) / 15
    assert late < early, (early, late)
    zero_shot = metrics["zeroshot", 1]["base"]["raw"]["acc"]
    coop = sum(metrics["coop", seed]["base"]["raw"]["acc"] for seed in (1, 2, 3)) / 3
    assert coop >= zero_shot - MARGIN, (coop, zero_shot)


# Points of base accuracy. Measured on the shipped model: CoOp 91.8 (seed mean) against zero-shot 89.0, and
# the same accuracies to the last digit under three sets of CPU kernels (BENCHMARKS.md, "The demo world across
# seeds and machines").
MARGIN = 3.0


def test_report_tables(root, checkpoint, tmp_path):
    """`python demo.py report` prints the demo tables: zero-shot, the probe, and seed ranges per run group."""
    for seed, (acc, ece) in enumerate([(80.0, 5.0), (82.5, 7.5)], 1):
        folder = tmp_path / "base2new" / "coop" / "ours" / "demo_shapes" / f"seed{seed}"
        folder.mkdir(parents=True)
        split = {"raw": {"acc": acc, "ece": ece}}
        (folder / "results.json").write_text(json.dumps({
            "method": "coop", "calib": "ours", "dataset": "demo_shapes", "protocol": "base2new", "seed": seed,
            "demo": True, "complete": True, "metrics": {"base": split, "novel": split}}))
    text = demo.report(tmp_path, root, checkpoint)
    assert text.startswith("Measured on: ") and f"sha256 {demo.SHIPPED_SHA256[:12]}" in text
    assert "| coop | ours | demo_shapes | 2 | 80.0-82.5 | 80.0-82.5 | 5.0-7.5 | 5.0-7.5 |" in text
    zs = {r["dataset"]: r for r in demo.zeroshot(root, checkpoint)}
    assert f"| demo_colours | 10+10 | {zs['demo_colours']['base_acc']:.1f} | " in text
