"""User errors: one line `error: ...` on stderr, a non-zero exit, no traceback, nothing left that looks like a run.

In-process cases run a method's main() inside `eval.user_errors()` exactly as its `__main__` block does; the
subprocess cases check what a user sees; the last test starts two run.sh on the demo world at once.
"""
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import eval as evaluation
from conftest import ROOT, make_eurosat, run_script
from test_coop import COMMON, load_method


@pytest.fixture
def world(tmp_path, tiny_world, monkeypatch):
    """A private copy of the tiny EuroSAT (so a test may damage it), the tiny CLIP and an output folder."""
    _, ckpt, _ = tiny_world
    monkeypatch.setenv("CP_CACHE", str(tmp_path / "splits"))
    return make_eurosat(tmp_path / "data"), ckpt, tmp_path / "out"


def argv(world, *extra):
    root, ckpt, out = world
    return [*COMMON, "--root", str(root), "--backbone", str(ckpt), "--output", str(out), "--epochs", "1", *extra]


def user_error(capsys, args, method="coop") -> tuple[int, str]:
    """(exit status, the one error line) of main(args) run as the script runs it; fails on anything else."""
    module = load_method(method)
    with pytest.raises(SystemExit) as e:
        with evaluation.user_errors():
            module.main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err and err.rstrip().endswith(lines[0]), err
    assert e.value.code not in (0, None)
    return e.value.code, lines[0]


def assert_no_run_left(out: Path) -> None:
    """No results.json and no run folder: at most the output root itself."""
    assert not list(out.rglob("results.json"))
    assert not [p for p in out.rglob("seed*")], sorted(out.rglob("*"))


@pytest.mark.parametrize("option, value", [("--shots", "0"), ("--shots", "-2"), ("--batch-size", "0"),
                                           ("--seed", "-1"), ("--epochs", "0"), ("--n-ctx", "0"),
                                           ("--workers", "-1"), ("--calib", "nosuchcalib")])
def test_bad_options_are_refused_before_any_work(world, capsys, monkeypatch, option, value):
    monkeypatch.setattr(data, "protocol_splits", lambda *a, **k: pytest.fail("data was read before the check"))
    status, line = user_error(capsys, argv(world, option, value))
    assert status == 2 and f"argument {option}" in line and "--help" in line
    assert not world[2].exists()


def test_eval_only_needs_load_and_nothing_unearned_is_written(world, capsys):
    status, line = user_error(capsys, argv(world, "--eval-only"))
    assert status == 2 and "--eval-only needs --load" in line
    assert not world[2].exists()


def _split_file(root: Path) -> Path:
    return root / "eurosat" / "split_zhou_EuroSAT.json"


def _damage_split(root: Path, text: str) -> str:
    _split_file(root).write_text(text)
    return str(_split_file(root))


def _drop_class(root: Path) -> str:
    split = json.loads(_split_file(root).read_text())
    split = {k: [e for e in v if e[1] != 9] for k, v in split.items()}
    _split_file(root).write_text(json.dumps(split))
    return "9 classes, expected 10"


def _remove_test_image(root: Path) -> str:
    split = json.loads(_split_file(root).read_text())
    path = root / "eurosat" / "2750" / split["test"][0][0]
    path.unlink()
    return str(path)


def _truncate_test_image(root: Path) -> str:
    split = json.loads(_split_file(root).read_text())
    path = root / "eurosat" / "2750" / split["test"][-1][0]
    path.write_bytes(path.read_bytes()[:200])
    return str(path)


@pytest.mark.parametrize("damage", [
    lambda root: _damage_split(root, '{"train": ['),  # truncated
    lambda root: _damage_split(root, "not json at all"),
    lambda root: _damage_split(root, "[1, 2, 3]"),  # wrong structure
    lambda root: _damage_split(root, '{"train": [["a.jpg", "x", "c"]], "val": [], "test": []}'),  # a bad entry
    _drop_class, _remove_test_image, _truncate_test_image,
    lambda root: (os.rename(root / "eurosat", root / "elsewhere"), str(root / "eurosat"))[1],  # missing dataset
], ids=["truncated-split", "not-json", "wrong-structure", "bad-entry", "wrong-class-count", "missing-image",
        "corrupt-test-jpeg", "missing-dataset"])
def test_dataset_problems_are_found_before_training(world, capsys, damage):
    expected = damage(world[0])
    status, line = user_error(capsys, argv(world))
    assert status == 1 and expected in line, line
    assert "epoch" not in capsys.readouterr().out  # nothing was trained
    assert_no_run_left(world[2])


def test_every_bad_image_is_listed_in_one_line(tmp_path):
    good = tmp_path / "good.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(good)
    bad = []
    for i in range(5):
        path = tmp_path / f"bad{i}.jpg"
        path.write_bytes(b"\xff\xd8\xff" + b"x" * i)
        bad.append(path)
    items = [data.Datum(str(p), 0, "c") for p in [good, *bad, tmp_path / "missing.jpg"]]
    with pytest.raises(data.DatasetError) as e:
        data.check_images(items, threads=2)
    message = str(e.value)
    assert message.startswith("6 of the 7 images this run reads cannot be decoded: ") and "and 3 more" in message
    assert str(bad[0]) in message and "\n" not in message
    data.check_images(items[:1])  # a good image passes


def test_backbone_problems_name_the_file(world, capsys, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(world[1].read_bytes()[:5000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": evaluation.Path("x")}, foreign)  # a pickled foreign object: not loadable as weights
    other = tmp_path / "other_architecture.pt"
    state = torch.load(world[1])
    state["positional_embedding"] = state["positional_embedding"][:, :8]  # widths that do not fit together
    torch.save(state, other)
    for path in (truncated, foreign, other):
        status, line = user_error(capsys, argv(world, "--backbone", str(path)))
        assert status == 1 and line.startswith(f"error: --backbone: {path}") and "CLIP" in line, line
    status, line = user_error(capsys, argv(world, "--backbone", "ViT-X/99"))
    assert "ViT-X/99" in line and "ViT-B/16" in line
    assert_no_run_left(world[2])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_checkpoint_problems_name_the_file(world, capsys, tmp_path):
    """--load of a missing file, of one that is not a checkpoint, of one with no tensors and of one that does
    not fit the model: one error line naming the file and --load, status 1, no run left."""
    junk, empty, other = tmp_path / "junk.pth.tar", tmp_path / "empty.pth.tar", tmp_path / "other.pth.tar"
    junk.write_bytes(b"not a checkpoint")
    torch.save({"state_dict": {}, "epoch": 1}, empty)
    torch.save({"state_dict": {"ctx": torch.zeros(3, 64)}}, other)  # 3 context vectors, the model has 16
    for path, expected in ((tmp_path / "missing.pth.tar", "does not exist"), (junk, "cannot read the checkpoint"),
                           (empty, "holds no tensors"), (other, "does not fit this model")):
        status, line = user_error(capsys, argv(world, "--eval-only", "--load", str(path)))
        assert status == 1 and expected in line and str(path) in line and "--load" in line, line
    assert_no_run_left(world[2])


def test_device_without_gpu_and_unknown_device(world, capsys):
    for device, expected in (("cuda", "--device cuda: torch sees 0 CUDA device"), ("tpu", "unknown --device 'tpu'")):
        status, line = user_error(capsys, argv(world, "--device", device))
        assert status == 1 and expected in line
    assert_no_run_left(world[2])


def test_output_that_is_a_file_or_read_only(world, capsys, monkeypatch):
    a_file = world[2].parent / "a_file"
    a_file.write_text("x")
    root, ckpt, _ = world
    status, line = user_error(capsys, argv((root, ckpt, a_file)))
    assert status == 1 and str(a_file) in line and "--output" in line
    monkeypatch.setattr(evaluation.os, "access", lambda *args, **kwargs: False)  # as for a non-root user
    status, line = user_error(capsys, argv(world))
    assert status == 1 and "Permission denied" in line and "--output" in line
    monkeypatch.undo()
    assert_no_run_left(world[2])


def test_full_disk_says_so_and_names_the_file(world, capsys, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data.os, "fsync", no_space)
    status, line = user_error(capsys, argv(world))
    assert status == 1 and "prompt.pt: the disk is full" in line
    monkeypatch.undo()
    assert_no_run_left(world[2])
    assert not list(world[2].rglob("*.tmp"))


def test_a_run_folder_is_trained_by_one_process_at_a_time(world, capsys, tmp_path):
    import fcntl
    run = world[2] / "base2new" / "coop" / "none" / "eurosat" / "seed1"
    run.mkdir(parents=True)
    (run / ".results.json.abc.tmp").write_text("{")  # left by a write killed before its rename
    with open(run / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        status, line = user_error(capsys, argv(world))
        assert status == 75 and str(run) in line and "another process" in line
    load_method("coop").main(argv(world))  # released: it runs, and cleans what the killed write left
    assert (run / "results.json").exists() and not list(run.glob(".*.tmp"))
    assert (run / "prompt.pt").stat().st_mode & 0o777 == (run / "results.json").stat().st_mode & 0o777


def test_same_metrics_with_any_worker_count(world):
    """Training augmentation uses no loader workers and evaluation decodes in a fixed order, so --workers
    changes no number."""
    module = load_method("coop")
    metrics = []
    for workers in ("0", "2"):
        out = world[2] / f"w{workers}"
        module.main(argv((world[0], world[1], out), "--workers", workers))
        metrics.append(json.loads(next(out.rglob("results.json")).read_text())["metrics"])
    assert metrics[0] == metrics[1]


def test_subprocess_user_errors_end_with_one_line(world):
    root, ckpt, out = world
    _truncate_test_image(root)
    for extra, status, expected in ((["--seed", "-1"], 2, "argument --seed"),
                                    ([], 1, "cannot be decoded")):
        p = run_script("methods/coop.py", *argv(world, *extra), check=False)
        assert p.returncode == status and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.rstrip().splitlines()[-1].startswith("error: ") and expected in p.stderr
    assert_no_run_left(out)


def test_demo_and_eval_user_errors_end_with_one_line(tmp_path):
    for script, args, status, expected in (
            ("demo.py", ["report", str(tmp_path / "nope")], 1, "no folder"),
            ("demo.py", ["pretrain", "--steps", "0"], 2, "argument --steps"),
            ("eval.py", ["summarize", str(tmp_path / "nope")], 2, "is not a directory"),
            ("eval.py", ["plan", "--datasets", "demo_shapez"], 1, "unknown dataset(s) demo_shapez")):
        p = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == status and "Traceback" not in p.stderr, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], p.stderr


def _run_sh(out: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DATA", "DATASETS", "SEEDS", "CALIBS", "EPOCHS")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.Popen(["bash", str(ROOT / "run.sh"), "coop", "--datasets", "demo_shapes", "--seeds", "1 2",
                             "--calibs", "none", "--epochs", "1", "--output", str(out), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_run_sh_on_one_output_train_every_run_once(tmp_path):
    out = tmp_path / "out"
    first, second = _run_sh(out), _run_sh(out)
    texts = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, texts
    done = sum(t.count("... done (") for t in texts)
    assert done == 2, texts  # two runs in the plan, each trained by exactly one of the two processes
    for seed in (1, 2):
        run = out / "demo" / "base2new" / "coop" / "none" / "demo_shapes" / f"seed{seed}"
        assert json.loads((run / "results.json").read_text())["complete"] is True
        assert (run / "log.txt").read_text().count("epoch   1/1") == 1


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the orphan through /proc")
def test_a_rerun_after_kill_9_of_run_sh_skips_the_run_still_training(tmp_path):
    out = tmp_path / "out"
    first = _run_sh(out, "--seeds", "1", "--epochs", "100000")
    log = out / "demo" / "base2new" / "coop" / "none" / "demo_shapes" / "seed1" / "log.txt"
    deadline = time.time() + 300
    while "epoch" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.2)
    first.kill()  # kill -9: its method process goes on, holding the run folder's lock
    first.wait()
    orphans = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline")
               if str(out).encode() in p.read_bytes() and b"methods/coop.py" in p.read_bytes()]
    try:
        assert len(orphans) == 1
        second = _run_sh(out, "--seeds", "1", "--epochs", "100000")
        text = second.communicate(timeout=120)[0]
        assert second.returncode == 0 and "skipped (another process is running it)" in text, text
        assert "epoch" in log.read_text()  # the orphan's log was not truncated
    finally:
        for pid in orphans:
            os.kill(pid, 9)
