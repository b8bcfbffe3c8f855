"""run.sh, the experiment driver, against a fake method script and stub eval.py / demo.py.

Each test copies run.sh into a temporary project whose methods/fake.py only records its command line
and writes results.json, so the loop, resume, --dry-run, failure reporting and the demo fallback are
checked in well under a second per run, independently of the real methods.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import data

REPO = Path(__file__).resolve().parent.parent

# Records its arguments (one JSON line per call in $FAKE_CALLS), then writes RUN_DIR/results.json
# with "complete": true. FAKE_FAIL="dataset:calib:seed" makes that run crash with exit 3;
# FAKE_NO_RESULT=1 makes every run exit 0 without writing results.
FAKE_METHOD = r'''
import argparse, json, os, sys
p = argparse.ArgumentParser()
for opt in ("--dataset", "--root", "--seed", "--shots", "--calib", "--backbone", "--output", "--protocol", "--epochs"):
    p.add_argument(opt)
args, extra = p.parse_known_args()
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps({"script": sys.argv[0], "argv": sys.argv[1:], "cwd": os.getcwd()}) + "\n")
print("fake training", args.dataset, args.calib, args.seed)
if os.environ.get("FAKE_FAIL") == f"{args.dataset}:{args.calib}:{args.seed}":
    print("Traceback: fake crash", file=sys.stderr)
    sys.exit(3)
if os.environ.get("FAKE_NO_RESULT"):
    sys.exit(0)
run_dir = os.path.join(args.output, args.protocol, "fake", args.calib, args.dataset, "seed" + args.seed)
with open(os.path.join(run_dir, "results.json"), "w") as f:
    json.dump({"method": "fake", "complete": True}, f, indent=2)
'''
# `plan` stands in for eval.py's (tested in test_eval.py) with a few keys of data.py's table, without torch.
STUB_EVAL = r'''
import os, sys
if sys.argv[1] == "plan":
    opts = dict(zip(sys.argv[2::2], sys.argv[3::2]))
    folders = {"imagenet": "imagenet", "caltech101": "caltech-101", "dtd": "dtd", "eurosat": "eurosat",
               "ucf101": "ucf101", "demo_shapes": "demo_shapes", "demo_colours": "demo_colours",
               "demo_patterns": "demo_patterns"}
    if opts["--protocol"] not in ("base2new", "xd"):
        sys.exit("error: --protocol must be one of base2new, xd")
    bad = [c for c in opts["--calibs"].split() if c not in ("none", "ours", "mdca", "mbls")]
    bad += [d for d in opts["--datasets"].split() if d not in folders]
    if bad:
        print("error: unknown", *bad, file=sys.stderr)
        sys.exit(2)
    keys = opts["--datasets"].split() or (["imagenet", "caltech101", "dtd", "eurosat", "ucf101"]
                                         if opts["--protocol"] == "base2new" else ["imagenet"])
    print("\n".join(f"{k} {folders[k]}" for k in keys))
    sys.exit(0)
assert sys.argv[1] == "summarize"
print("SUMMARY", *sys.argv[2:])
sys.exit(int(os.environ.get("FAKE_SUMMARY_RC", "0")))
'''
# Prints the two lines of the demo contract on stdout (progress on stderr) and creates what they name.
STUB_DEMO = r'''
import os, sys
assert sys.argv[1] == "prepare"
root = os.path.join(os.environ["FAKE_HOME"], "demo root")
os.makedirs(root, exist_ok=True)
ckpt = os.path.join(os.environ["FAKE_HOME"], "tiny_clip.pt")
open(ckpt, "w").close()
print("preparing demo world ...", file=sys.stderr)
print("DEMO_ROOT='%s'" % root)
print("DEMO_BACKBONE=%s" % ckpt)
'''


@pytest.fixture
def proj(tmp_path):
    """A project dir with run.sh, methods/fake.py, methods/other.py, stub eval.py and demo.py."""
    root = tmp_path / "proj"
    (root / "methods").mkdir(parents=True)
    shutil.copy(REPO / "run.sh", root / "run.sh")
    (root / "methods" / "fake.py").write_text(FAKE_METHOD)
    (root / "methods" / "other.py").write_text("raise SystemExit(1)\n")
    (root / "eval.py").write_text(STUB_EVAL)
    (root / "demo.py").write_text(STUB_DEMO)
    data = tmp_path / "data"
    for folder in ("caltech-101", "dtd", "imagenet"):  # caltech101's folder name differs from its key
        (data / folder).mkdir(parents=True)
    return root


def run(proj, *args, **env):
    """bash run.sh ARGS in proj, with a clean settings environment plus env; returns (proc, calls)."""
    home = proj.parent
    base = {k: v for k, v in os.environ.items()
            if k not in ("DATA", "DATASETS", "SEEDS", "SHOTS", "BACKBONE", "OUTPUT", "EPOCHS", "CALIBS",
                         "PROTOCOL", "DEMO_EPOCHS", "DEMO_ROOT", "DEMO_BACKBONE")}
    base.update(PYTHON=sys.executable, FAKE_CALLS=str(home / "calls.jsonl"), FAKE_HOME=str(home),
                DATA=str(home / "data"), OUTPUT=str(home / "out"))
    base.update(env)
    p = subprocess.run(["bash", str(proj / "run.sh"), *args], cwd=home, env=base,
                       capture_output=True, text=True, timeout=60)
    calls_file = home / "calls.jsonl"
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()] if calls_file.exists() else []
    calls_file.unlink(missing_ok=True)
    return p, calls


def expected_argv(home, dataset, calib, seed, *, shots="16", backbone="ViT-B/16", protocol="base2new",
                  data=None, output=None, epochs=None, extra=()):
    argv = ["--dataset", dataset, "--root", str(data or home / "data"), "--seed", str(seed), "--shots", shots,
            "--calib", calib, "--backbone", backbone, "--output", str(output or home / "out"),
            "--protocol", protocol]
    return argv + (["--epochs", str(epochs)] if epochs else []) + list(extra)


def run_dir(home, dataset, calib, seed, protocol="base2new", output=None):
    return Path(output or home / "out") / protocol / "fake" / calib / dataset / f"seed{seed}"


def test_loops_datasets_seeds_calibs_with_the_right_arguments(proj):
    home = proj.parent
    p, calls = run(proj, "fake", "--datasets", "caltech101 dtd", "--seeds=1 2", "--epochs", "3",
                   "--", "--lr", "0.5", "--ctx-init", "a photo of a")
    assert p.returncode == 0, p.stdout + p.stderr
    extra = ["--lr", "0.5", "--ctx-init", "a photo of a"]
    want = [expected_argv(home, d, c, s, epochs=3, extra=extra)
            for d in ("caltech101", "dtd") for s in (1, 2) for c in ("none", "ours")]
    assert [c["argv"] for c in calls] == want
    assert all(c["script"] == "methods/fake.py" and c["cwd"] == str(proj) for c in calls)
    assert "[1/8] fake none caltech101 seed1 ... done (" in p.stdout
    assert "[8/8] fake ours dtd seed2 ... done (" in p.stdout
    for d, c, s in (("caltech101", "none", 1), ("dtd", "ours", 2)):
        log = run_dir(home, d, c, s) / "log.txt"
        assert log.read_text() == f"fake training {d} {c} {s}\n"  # the run's output went to its log
    assert p.stdout.rstrip().splitlines()[-1] == ("run.sh: 8 runs: 8 done, 0 skipped (already complete), "
                                                  "0 skipped (being run by another process), 0 failed")
    assert f"SUMMARY {home / 'out'} --paper\n" in p.stdout  # real base-to-novel runs: beside the paper's tables


def test_defaults_from_environment_and_relative_paths(proj):
    home = proj.parent
    # Relative DATA/OUTPUT are taken from the caller's directory although run.sh works in the repo.
    p, calls = run(proj, "fake", DATA="data", OUTPUT="./rel_out", DATASETS="dtd", SEEDS="7",
                   CALIBS="mdca", SHOTS="4", BACKBONE="RN50")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [c["argv"] for c in calls] == [
        expected_argv(home, "dtd", "mdca", 7, shots="4", backbone="RN50", output=home / "rel_out")]
    assert (run_dir(home, "dtd", "mdca", 7, output=home / "rel_out") / "results.json").exists()


def test_default_seeds_calibs_and_missing_datasets(proj):
    home = proj.parent
    p, calls = run(proj, "fake", "--datasets", "dtd eurosat caltech101 ucf101")
    # The present ones run (1 2 3 x none ours each), the missing ones are named at the start and the end
    # and make the exit status 1.
    assert [c["argv"] for c in calls] == [expected_argv(home, d, c, s) for d in ("dtd", "caltech101")
                                             for s in (1, 2, 3) for c in ("none", "ours")]
    assert p.returncode == 1
    assert "missing under" in p.stderr and " eurosat ucf101" in p.stderr
    assert "Missing datasets (no folder under" in p.stdout and p.stdout.rstrip().endswith(" eurosat ucf101")
    assert "DEMO" not in p.stdout


def test_xd_protocol_runs_the_source_only(proj):
    home = proj.parent
    p, calls = run(proj, "fake", "--protocol", "xd", "--seeds", "1", "--calibs", "ours")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [c["argv"] for c in calls] == [expected_argv(home, "imagenet", "ours", 1, protocol="xd")]
    assert (run_dir(home, "imagenet", "ours", 1, protocol="xd") / "results.json").exists()
    assert f"SUMMARY {home / 'out'}\n" in p.stdout  # the paper's tables are base-to-novel: no --paper


def test_resume_redoes_incomplete_runs_only(proj):
    home = proj.parent
    done = run_dir(home, "dtd", "none", 1)
    killed = run_dir(home, "dtd", "ours", 1)  # killed midway: a log but no results.json
    partial = run_dir(home, "dtd", "none", 2)  # results.json without "complete": true
    for d in (done, killed, partial):
        d.mkdir(parents=True)
        (d / "log.txt").write_text("old log\n")
    (done / "results.json").write_text(json.dumps({"complete": True}, indent=2))
    (partial / "results.json").write_text(json.dumps({"complete": False}))
    p, calls = run(proj, "fake", "--datasets", "dtd", "--seeds", "1 2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [c["argv"] for c in calls] == [expected_argv(home, "dtd", c, s)
                                             for c, s in (("ours", 1), ("none", 2), ("ours", 2))]
    assert "[1/4] fake none dtd seed1 ... skipped (done)" in p.stdout
    assert "[2/4] fake ours dtd seed1 (redoing incomplete run) ... done (" in p.stdout
    assert (done / "log.txt").read_text() == "old log\n"  # untouched
    assert json.loads((partial / "results.json").read_text())["complete"] is True
    assert "4 runs: 3 done, 1 skipped (already complete), 0 skipped (being run by another process), 0 failed" in p.stdout
    # Everything finished now: a second call runs nothing and still prints the summary.
    p, calls = run(proj, "fake", "--datasets", "dtd", "--seeds", "1 2")
    assert p.returncode == 0 and calls == [] and p.stdout.count("skipped (done)") == 4
    assert "SUMMARY" in p.stdout


def test_dry_run_prints_self_contained_commands_and_runs_nothing(proj):
    home = proj.parent
    done = run_dir(home, "caltech101", "none", 1)
    done.mkdir(parents=True)
    (done / "results.json").write_text('{"complete": true}')
    p, calls = run(proj, "fake", "--datasets", "caltech101 dtd", "--seeds", "1", "--dry-run",
                   "--", "--note", "two words")
    assert p.returncode == 0, p.stderr
    assert calls == [] and "SUMMARY" not in p.stdout
    assert not run_dir(home, "dtd", "none", 1).exists()  # not even a directory
    lines = p.stdout.splitlines()
    expected = []
    for d, c in (("caltech101", "ours"), ("dtd", "none"), ("dtd", "ours")):  # caltech101/none is done
        rd = run_dir(home, d, c, 1)
        cmd = [sys.executable, "methods/fake.py", *expected_argv(home, d, c, 1, extra=["--note", "two words"])]
        q = shlex.quote
        lock = "import fcntl; fcntl.flock(9, fcntl.LOCK_EX | fcntl.LOCK_NB)"
        expected.append(f"cd {q(str(proj))} && mkdir -p {q(str(rd))} && exec 9>>{q(str(rd))}/.lock && "
                        f"{{ {q(sys.executable)} -c {q(lock)} 2>/dev/null || {{ echo \"skipped: {q(str(rd))} is "
                        f"locked by another process\" >&2; exit 75; }}; }} && {{ ! grep -Eq "
                        f"'\"complete\"[[:space:]]*:[[:space:]]*true' {q(str(rd / 'results.json'))} 2>/dev/null "
                        f"|| exit 0; }} && RUN_LOCK_FD=9 {shlex.join(cmd)} > {q(str(rd / 'log.txt'))} 2>&1")
    # bash's printf %q and Python's shlex.quote quote differently; compare what the shell makes of them.
    assert [shlex.split(x) for x in lines] == [shlex.split(x) for x in expected]
    # Each line works on its own, from anywhere (as under GNU parallel or a SLURM array task).
    for line in lines:
        subprocess.run(["bash", "-c", line], cwd="/", check=True, env={**os.environ, "FAKE_CALLS": str(home / "c")})
    assert (run_dir(home, "dtd", "ours", 1) / "log.txt").read_text() == "fake training dtd ours 1\n"
    assert len((home / "c").read_text().splitlines()) == 3
    # Now all are complete: the dry run has nothing left to print.
    p, _ = run(proj, "fake", "--datasets", "caltech101 dtd", "--seeds", "1", "--dry-run")
    assert p.returncode == 0 and p.stdout == ""


def test_one_failure_is_reported_and_the_others_still_run(proj):
    home = proj.parent
    stale = run_dir(home, "dtd", "ours", 1) / "results.json"  # from an earlier, interrupted attempt
    stale.parent.mkdir(parents=True)
    stale.write_text('{"complete": false}')
    p, calls = run(proj, "fake", "--datasets", "dtd", "--seeds", "1 2", FAKE_FAIL="dtd:ours:1")
    assert p.returncode == 1
    assert len(calls) == 4  # the runs after the failing one went on
    log = run_dir(home, "dtd", "ours", 1) / "log.txt"
    assert f"[2/4] fake ours dtd seed1 (redoing incomplete run) ... FAILED (exit 3; see {log})" in p.stdout
    assert "Traceback: fake crash" in log.read_text()
    assert not stale.exists()  # no incomplete result left behind to be mistaken for one
    assert "4 runs: 3 done, 0 skipped (already complete), 0 skipped (being run by another process), 1 failed" in p.stdout
    assert p.stdout.rstrip().endswith(f"Failed runs (log files):\n  [2/4] fake ours dtd seed1: {log}")
    assert "SUMMARY" in p.stdout  # the tables of the runs that worked
    # The next call redoes only the failed run.
    p, calls = run(proj, "fake", "--datasets", "dtd", "--seeds", "1 2")
    assert p.returncode == 0 and [c["argv"] for c in calls] == [expected_argv(home, "dtd", "ours", 1)]


def test_exit_0_without_results_and_summary_failure_are_failures(proj):
    p, calls = run(proj, "fake", "--datasets", "dtd", "--seeds", "1", "--calibs", "none", FAKE_NO_RESULT="1")
    assert p.returncode == 1 and len(calls) == 1
    assert "FAILED (exit 0 but no complete results.json; see " in p.stdout
    p, calls = run(proj, "fake", "--datasets", "dtd", "--seeds", "1", "--calibs", "none", FAKE_SUMMARY_RC="5")
    assert p.returncode == 1 and len(calls) == 1
    assert "eval.py summarize failed (exit 5)" in p.stdout and "0 failed" in p.stdout


def test_demo_fallback_when_no_dataset_exists(proj):
    home = proj.parent
    empty = home / "empty_data"
    empty.mkdir()
    p, calls = run(proj, "fake", "--seeds", "1", "--calibs", "ours", DATA=str(empty))
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"No dataset found under {empty}" in p.stdout and '"Datasets"' in p.stdout
    demo_root, ckpt, out = home / "demo root", home / "tiny_clip.pt", home / "out" / "demo"
    assert [c["argv"] for c in calls] == [
        expected_argv(home, d, "ours", 1, data=demo_root, backbone=str(ckpt), output=out, epochs=20)
        for d in ("demo_shapes", "demo_colours", "demo_patterns")]
    assert (run_dir(home, "demo_patterns", "ours", 1, output=out) / "results.json").exists()
    assert f"SUMMARY {out}\n" in p.stdout
    assert p.stdout.count("DEMO WORLD (synthetic data, tiny CLIP): numbers are not the paper's") >= 2
    # EPOCHS wins over DEMO_EPOCHS; DEMO_EPOCHS sets the demo default.
    _, calls = run(proj, "fake", "--seeds", "2", "--calibs", "none", "--epochs", "2", DATA=str(empty))
    assert {c["argv"][c["argv"].index("--epochs") + 1] for c in calls} == {"2"}
    _, calls = run(proj, "fake", "--seeds", "3", "--calibs", "none", DATA=str(empty), DEMO_EPOCHS="5")
    assert {c["argv"][c["argv"].index("--epochs") + 1] for c in calls} == {"5"}
    # --no-demo: a plain failure instead.
    p, calls = run(proj, "fake", "--no-demo", DATA=str(empty))
    assert p.returncode == 1 and calls == [] and "--no-demo" in p.stderr


def test_help_and_usage_errors(proj):
    p, _ = run(proj, "--help")
    assert p.returncode == 0 and p.stdout.startswith("Usage: bash run.sh METHOD")
    for word in ("--data", "--datasets", "--seeds", "--calibs", "--shots", "--backbone", "--output", "--epochs",
                 "--protocol", "--dry-run", "--no-demo", "DATA", "DATASETS", "SEEDS", "CALIBS", "SHOTS", "BACKBONE",
                 "OUTPUT", "EPOCHS", "PYTHON", "DEMO_EPOCHS", "parallel", "SLURM_ARRAY_TASK_ID"):
        assert word in p.stdout, word
    # The default dataset list in the usage text is data.py's (the one source run.sh's checks use).
    listed = p.stdout.split("base-to-novel datasets", 1)[1].split(";", 1)[0].split()
    assert listed == list(data.BASE_TO_NOVEL)
    p, calls = run(proj, "nosuch")
    assert p.returncode == 2 and calls == []
    assert "methods/nosuch.py" in p.stderr and "available: fake other" in p.stderr
    for bad in (["fake", "--bogus"], ["fake", "--protocol", "dg"], ["fake", "--seeds", "one"], ["fake", "--shots"]):
        p, calls = run(proj, *bad)
        assert p.returncode == 2 and calls == [] and "error:" in p.stderr, bad


def test_zeroshot_runs_calib_none_only(proj):
    home = proj.parent
    (proj / "methods" / "zeroshot.py").write_text(FAKE_METHOD.replace('"fake"', '"zeroshot"'))
    p, calls = run(proj, "zeroshot", "--datasets", "dtd", "--seeds", "1")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [c["argv"] for c in calls] == [expected_argv(home, "dtd", "none", 1)]


def test_requested_datasets_and_calibrations_are_checked_before_any_run(proj):
    home = proj.parent
    empty = home / "empty_data"
    empty.mkdir()
    # A typo is an error, never a fallback to the demo world; so is an unknown calibration. Nothing is created.
    for bad in (["--datasets", "demo_shapez"], ["--datasets", "dtd", "--calibs", "none nosuchcalib"]):
        p, calls = run(proj, "fake", *bad)
        assert p.returncode == 2 and calls == [] and "error: unknown" in p.stderr, (bad, p.stderr)
        assert not (home / "out").exists()
    # Real datasets asked for by name, none of them present: an error naming the folders, not the demo world.
    p, calls = run(proj, "fake", "--datasets", "dtd caltech101", DATA=str(empty))
    assert p.returncode == 1 and calls == [] and "DEMO" not in p.stdout
    assert "none of the requested datasets" in p.stderr and "dtd/ caltech-101/" in p.stderr
    # Demo datasets asked for by name: the demo world, narrowed to them.
    p, calls = run(proj, "fake", "--datasets", "demo_colours", "--seeds", "1", "--calibs", "none")
    assert p.returncode == 0, p.stdout + p.stderr
    assert [c["argv"][1] for c in calls] == ["demo_colours"] and "DEMO WORLD" in p.stdout


def test_a_run_locked_by_another_process_is_skipped_not_redone(proj):
    import fcntl
    home = proj.parent
    busy = run_dir(home, "dtd", "none", 1)
    busy.mkdir(parents=True)
    (busy / "log.txt").write_text("the other process's log\n")
    with open(busy / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a method script started by another run.sh holds it
        p, calls = run(proj, "fake", "--datasets", "dtd", "--seeds", "1")
        assert p.returncode == 0, p.stdout + p.stderr
        assert [c["argv"] for c in calls] == [expected_argv(home, "dtd", "ours", 1)]
        assert "[1/2] fake none dtd seed1 ... skipped (another process is running it)" in p.stdout
        assert "1 done, 0 skipped (already complete), 1 skipped (being run by another process)" in p.stdout
        assert (busy / "log.txt").read_text() == "the other process's log\n"  # neither truncated nor removed
        # A --dry-run line for it skips as well, with status 75.
        p, _ = run(proj, "fake", "--datasets", "dtd", "--seeds", "1", "--calibs", "none", "--dry-run")
        line = p.stdout.strip()
        r = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env={**os.environ, "FAKE_CALLS": str(home / "c")})
        assert r.returncode == 75 and "is locked by another process" in r.stderr and not (home / "c").exists()
    p, calls = run(proj, "fake", "--datasets", "dtd", "--seeds", "1")  # released: now it runs
    assert [c["argv"] for c in calls] == [expected_argv(home, "dtd", "none", 1)]
