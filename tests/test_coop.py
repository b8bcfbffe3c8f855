"""CoOp and zero-shot CLIP end to end on a tiny CLIP and a tiny EuroSAT-layout dataset."""
import dataclasses
import importlib.util
import json
import pickle

import pytest
import torch

import clip
import data
import eval as evaluation
from conftest import ROOT, run_script

COMMON = ["--dataset", "eurosat", "--shots", "4", "--batch-size", "4", "--device", "cpu"]


def load_method(name: str):
    spec = importlib.util.spec_from_file_location(f"method_{name}", ROOT / "methods" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_results(path, method, calib="none"):
    results = json.loads(path.read_text())
    assert results["complete"] is True and results["method"] == method and results["calib"] == calib
    for split in ("base", "novel"):
        for variant in ("raw", "ts", "dac"):
            m = results["metrics"][split][variant]
            assert 0 <= m["acc"] <= 100 and 0 <= m["ece"] <= 100 and m["nll"] > 0
        # Temperature scaling and DAC never change predictions.
        assert results["metrics"][split]["ts"]["acc"] == results["metrics"][split]["raw"]["acc"]
        assert results["metrics"][split]["dac"]["acc"] == results["metrics"][split]["raw"]["acc"]
    assert results["temperature"] > 0 and results["timings"]["total_s"] > 0
    assert results["ts_fit_n"] == val_split_size(results["args"])  # what temperature scaling was fitted on
    return results


def val_split_size(args: dict) -> int:
    """Images in the run's few-shot validation split of the base classes, drawn again here from the dataset."""
    full = data.load_dataset(args["dataset"], args["root"])
    train, val = data.few_shot(full.train, full.val, args["shots"], args["seed"])
    return len(data.subsample_classes(dataclasses.replace(full, train=train, val=val), "base").val)


def test_coop_smoke_run_writes_complete_results(tiny_world, tmp_path):
    root, ckpt, cache = tiny_world
    proc = run_script("methods/coop.py", *COMMON, "--root", root, "--backbone", ckpt, "--output", tmp_path,
                      "--epochs", "2", "--calib", "ours", cache=cache)
    run_dir = tmp_path / "base2new" / "coop" / "ours" / "eurosat" / "seed1"
    results = check_results(run_dir / "results.json", "coop", "ours")
    assert results["args"]["epochs"] == 2 and results["shots"] == 4 and results["seed"] == 1
    assert results["ts_fit_n"] == 5 * 2  # 5 base classes x their 2 val images (fewer than min(shots, 4) = 4)
    assert "epoch   2/2" in proc.stdout
    # Only the context vectors train, and only they are saved.
    assert "trainable: prompt_learner.ctx (1024 values)" in proc.stdout  # 16 x width 64
    state = torch.load(run_dir / "prompt.pt", weights_only=True)
    assert set(state) == {"ctx"} and state["ctx"].shape == (16, 64)
    for name in ("base", "novel"):
        assert (run_dir / f"reliability_{name}_raw.png").stat().st_size > 0


def test_zeroshot_smoke_run(tiny_world, tmp_path):
    root, ckpt, cache = tiny_world
    run_script("methods/zeroshot.py", "--dataset", "eurosat", "--shots", "4", "--device", "cpu", "--root", root, "--backbone", ckpt, "--output", tmp_path, cache=cache)
    check_results(tmp_path / "base2new" / "zeroshot" / "none" / "eurosat" / "seed1" / "results.json", "zeroshot")


def test_coop_from_template_equals_zero_shot_logits(tiny_world):
    """Context initialised from "a photo of a" turns CoOp's prompts into the template's: same logits, exactly."""
    _, ckpt, _ = tiny_world
    coop = load_method("coop")
    clip_model, _ = clip.load(str(ckpt), device="cpu")
    args = coop.parse_args(["--ctx-init", "a photo of a"])
    names = ["Forest", "Highway_or_Road", "Sea or Lake"]
    model = coop.CustomCLIP(args, names, clip_model)
    assert model.prompt_learner.n_ctx == 4
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = model.image_features(images)
        logits = model(features)
        # The zero-shot path (methods/zeroshot.py): the template's features, ids cut after EOT like CoOp's.
        text = evaluation.text_features(clip_model, [f"a photo of a {n.replace('_', ' ')}." for n in names])
        image = torch.nn.functional.normalize(clip_model.encode_image(images), dim=-1)
        expected = clip_model.logit_scale.exp() * image @ text.t()
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


class _Scheduler:
    """Stands in for the scheduler objects the official code pickles into its checkpoints."""

    def __reduce__(self):  # unpickling this would run a command
        return (print, ("ARBITRARY CODE RAN",))


def test_official_checkpoint_layout_loads_without_running_pickled_code(tiny_world, tmp_path):
    root, ckpt, cache = tiny_world
    ctx = torch.randn(16, 64) * 0.02
    official = {"state_dict": {"ctx": ctx, "token_prefix": torch.zeros(5, 1, 64), "token_suffix": torch.zeros(5, 15, 64)},
                "epoch": 200, "optimizer": {"state": {}, "param_groups": []}, "scheduler": _Scheduler()}
    path = tmp_path / "model.pth.tar-200"
    torch.save(official, path, pickle_module=pickle)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # the plain safe loader refuses the pickled object
    out = tmp_path / "out"
    proc = run_script("methods/coop.py", *COMMON, "--root", root, "--backbone", ckpt, "--output", out,
                      "--eval-only", "--load", path, cache=cache)
    assert "ARBITRARY CODE RAN" not in proc.stdout + proc.stderr
    check_results(out / "base2new" / "coop" / "none" / "eurosat" / "seed1" / "results.json", "coop")
    assert torch.equal(evaluation.read_checkpoint(path)["ctx"], ctx)


def test_nan_loss_stops_without_results(tiny_world, tmp_path):
    root, ckpt, cache = tiny_world
    proc = run_script("methods/coop.py", *COMMON, "--root", root, "--backbone", ckpt, "--output", tmp_path,
                      "--epochs", "4", "--lr", "1e38", cache=cache, check=False)
    assert proc.returncode != 0
    assert "loss became" in proc.stderr
    assert not list(tmp_path.rglob("results.json"))
