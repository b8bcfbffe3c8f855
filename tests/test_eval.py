"""Hand-computed metrics, post-hoc calibrators, result files and summaries of eval.py (definitions in eval.py's docstrings)."""
import csv
import json
import math

import numpy as np
import pytest
import torch

import eval as ev


def binary_logits(confs):
    """Two-class logits whose class-0 probability is each given confidence (>= 0.5); 1.0 exactly via -1000."""
    rows = [[0.0, -1000.0] if c == 1.0 else [math.log(c), math.log(1 - c)] for c in confs]
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ binned errors
def test_ece_mce_ace_hand_values_with_conf_one_and_empty_bins():
    perm = [4, 0, 6, 2, 5, 1, 3]  # unsorted on purpose: ACE must sort by confidence itself
    conf = np.array([1.0, 0.95, 0.85, 0.85, 0.5, 0.45, 0.25])[perm]
    correct = np.array([1, 0, 1, 0, 1, 0, 0])[perm]
    # bins (0.9,1]: {1.0 ok, .95 wrong} gap |.5-.975|=.475; (0.8,.9]: gap |.5-.85|=.35;
    # (0.4,.5]: {.5 ok, .45 wrong} gap |.5-.475|=.025; (0.2,.3]: gap .25; six bins empty
    ece, mce, ace = ev.calibration_errors(conf, correct, n_bins=10)
    assert ece == pytest.approx((2 * 0.475 + 2 * 0.35 + 2 * 0.025 + 0.25) / 7)
    assert mce == pytest.approx(0.475)  # textbook max, not the mass-weighted 2/7 * .475
    # 10 equal-mass bins over 7 samples: 7 singletons -> mean |correct - conf|
    assert ace == pytest.approx((0 + 0.95 + 0.15 + 0.85 + 0.5 + 0.45 + 0.25) / 7)
    # 3 equal-mass bins: sizes 3, 2, 2 of the sorted confidences
    _, _, ace3 = ev.calibration_errors(conf, correct, n_bins=3)
    assert ace3 == pytest.approx((3 * abs(1 / 3 - 1.2 / 3) + 2 * 0.35 + 2 * 0.475) / 7)


def test_bin_boundaries_are_left_open_right_closed():
    # 0.5 belongs to (0.4, 0.5] together with 0.45: gap |0.5 - 0.475|; a floor rule would give 0.475
    ece, mce, _ = ev.calibration_errors(np.array([0.5, 0.45]), np.array([1, 0]))
    assert ece == pytest.approx(0.025) and mce == pytest.approx(0.025)
    ece, _, _ = ev.calibration_errors(np.array([1.0]), np.array([0]))  # conf 1.0 -> last bin, not out of range
    assert ece == pytest.approx(1.0)


def test_compute_metrics_hand_values():
    z = binary_logits([1.0, 0.95, 0.85, 0.85, 0.55, 0.58])
    y = torch.tensor([0, 1, 0, 1, 0, 1])  # all predict class 0
    m = ev.compute_metrics(z, y)
    assert m["acc"] == pytest.approx(50.0)
    assert m["ece"] == pytest.approx(100 * (2 * 0.475 + 2 * 0.35 + 2 * 0.065) / 6)
    assert m["mce"] == pytest.approx(47.5)
    assert m["confidence"] == pytest.approx(100 * (1 + 0.95 + 0.85 + 0.85 + 0.55 + 0.58) / 6)
    assert m["n"] == 6


def test_perfect_calibration_gives_zero():
    confs = [0.6] * 10 + [0.9] * 10 + [1.0] * 10
    wrong = {0, 1, 2, 3, 10}  # 6/10 right at 0.6, 9/10 at 0.9, 10/10 at 1.0
    y = torch.tensor([1 if i in wrong else 0 for i in range(30)])
    m = ev.compute_metrics(binary_logits(confs), y, n_bins=10)
    assert m["ece"] == pytest.approx(0, abs=1e-9) and m["mce"] == pytest.approx(0, abs=1e-9)
    assert ev.compute_metrics(binary_logits(confs), y, n_bins=3)["ace"] == pytest.approx(0, abs=1e-9)
    y_bad = y.clone()
    y_bad[25] = 1
    assert ev.compute_metrics(binary_logits(confs), y_bad)["ece"] == pytest.approx(100 / 30)


def test_nll_brier_against_direct_formulas():
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(50, 7, generator=g) * 5).half()  # fp16 input must still be computed in float64
    y = torch.randint(0, 7, (50,), generator=g)
    zn = z.double().numpy()
    p = np.exp(zn - zn.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    m = ev.compute_metrics(z, y)
    assert m["nll"] == pytest.approx(-np.mean(np.log(p[np.arange(50), y.numpy()])), rel=1e-9)
    onehot = np.eye(7)[y.numpy()]
    assert m["brier"] == pytest.approx(np.mean(np.sum((p - onehot) ** 2, axis=1)), rel=1e-9)
    assert m["acc"] == pytest.approx(100 * np.mean(p.argmax(1) == y.numpy()))


def test_macro_f1_and_margins_hand_values():
    pred = [0, 1, 1, 1, 0]
    y = torch.tensor([0, 0, 1, 1, 2])
    z = torch.zeros(5, 4)
    z[torch.arange(5), torch.tensor(pred)] = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0])
    m = ev.compute_metrics(z, y)
    # F1: class 0 = 2/(2+1+1), class 1 = 4/(4+1), class 2 = 0, class 3 never seen -> excluded
    assert m["macro_f1"] == pytest.approx(100 * (0.5 + 0.8 + 0.0) / 3)
    margins = np.array([3.0, -1.0, 2.0, 5.0, -4.0])  # true minus runner-up
    assert m["margin_mean"] == pytest.approx(margins.mean())
    assert m["margin_std"] == pytest.approx(margins.std())  # population std


# ---------------------------------------------------------------------------------------- calibrators
def test_temperature_scaling_recovers_known_temperature():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20000, 10, generator=g) * 4
    t0 = 2.5
    y = torch.multinomial((z / t0).softmax(dim=1), 1, generator=g).squeeze(1)
    t = ev.fit_temperature(z, y)
    assert t == pytest.approx(t0, rel=0.03)

    def nll(temp):
        return torch.nn.functional.cross_entropy(z.double() / temp, y).item()
    assert nll(t) <= min(nll(t * 1.01), nll(t / 1.01))  # exact optimum, not just close to t0
    assert ev.compute_metrics(z / t, y)["ece"] < ev.compute_metrics(z, y)["ece"]


def test_temperature_clips_to_bounds_for_separable_data():
    z = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert ev.fit_temperature(z, torch.tensor([0, 1]), t_min=0.05) == 0.05
    assert ev.fit_temperature(z, torch.tensor([1, 0]), t_max=50.0) == 50.0


def test_dac_hand_value_and_base_classes_untouched():
    tuned_base = torch.tensor([[1.0, 0.0]])
    zs_base = torch.tensor([[1.0, 0.0]])
    tuned_test = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # a base class (unnormalised on purpose) and a novel one
    zs_test = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    f = ev.dac_factors(tuned_test, zs_test, tuned_base, zs_base, k=5)  # k clipped to 1 base class
    assert f[0].item() == 1.0  # nearest tuned distance 0 < 0.05, whatever the zero-shot distance says
    # novel: d_tuned = sqrt(2), d_zs = |(0.6, 0.8) - (1, 0)| = sqrt(0.8); exp(-d_tuned) / exp(-d_zs)
    assert f[1].item() == pytest.approx(math.exp(math.sqrt(0.8) - math.sqrt(2)), rel=1e-6)


def test_dac_uses_mean_of_k_nearest():
    base = torch.eye(3)
    test = torch.tensor([[1.0, 1.0, 0.0]]) / math.sqrt(2)
    f = ev.dac_factors(test, base[:1], base, base, k=2)
    # tuned: distances to e1, e2 = sqrt(2 - sqrt 2) each (2 nearest); zero-shot test = e1: 0 and sqrt 2
    d_t, d_z = math.sqrt(2 - math.sqrt(2)), (0 + math.sqrt(2)) / 2
    assert f.item() == pytest.approx(math.exp(d_z - d_t), rel=1e-6)


def test_dac_never_changes_predictions_and_base_factor_is_one():
    g = torch.Generator().manual_seed(2)
    base_t = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1)
    base_z = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1)
    novel_t = torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=1)
    novel_z = torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=1)
    f_base = ev.dac_factors(base_t, base_z, base_t, base_z)
    assert torch.equal(f_base, torch.ones(6))
    logits = torch.randn(200, 6, generator=g) * 20
    assert torch.equal(ev.apply_dac(logits, f_base), logits)
    f = ev.dac_factors(torch.cat([base_t, novel_t]), torch.cat([base_z, novel_z]), base_t, base_z)
    assert torch.equal(f[:6], torch.ones(6)) and (f[6:] != 1).all() and (f > 0).all()
    logits = torch.randn(300, 11, generator=g) * 20
    out = ev.apply_dac(logits, f)
    assert torch.equal(out.argmax(1), logits.argmax(1))
    rows = logits.argmax(1) >= 6
    assert not torch.allclose(out[rows], logits[rows])
    assert torch.allclose(out / logits, f[logits.argmax(1)][:, None].expand_as(out))


# ------------------------------------------------------------------------------------- running, plots
def test_predict_concatenates_on_cpu_float32_without_grad():
    batches = [(torch.full((2, 3), float(i)), torch.tensor([i, i + 10])) for i in range(3)]
    w = torch.ones(3, 4, requires_grad=True)

    def fn(x):
        assert not torch.is_grad_enabled()
        return (x @ w).half(), x[:, :2]
    (logits, feats), labels = ev.predict(fn, batches, "cpu", desc="t")
    assert logits.dtype == torch.float32 and feats.dtype == torch.float32 and not logits.requires_grad
    assert logits.shape == (6, 4) and feats.shape == (6, 2)
    assert logits[:, 0].tolist() == [0, 0, 3, 3, 6, 6] and labels.tolist() == [0, 10, 1, 11, 2, 12]
    single, _ = ev.predict(lambda x: x.sum(1), batches, "cpu")
    assert isinstance(single, torch.Tensor) and single.tolist() == [0, 0, 3, 3, 6, 6]
    with pytest.raises(ValueError, match="no batches"):
        ev.predict(fn, [], "cpu")


def test_evaluate_split_variants_and_diagrams(tmp_path):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(120, 4, generator=g) * 6
    y = torch.randint(0, 4, (120,), generator=g)
    factors = torch.tensor([1.0, 1.0, 0.5, 2.0])
    res = ev.evaluate_split(z, y, temperature=2.0, dac=factors, out_dir=tmp_path, name="novel")
    assert set(res) == {"raw", "ts", "dac"}
    assert res["raw"] == ev.compute_metrics(z, y)
    assert res["ts"]["ece"] == pytest.approx(ev.compute_metrics(z / 2.0, y)["ece"])
    assert res["raw"]["acc"] == res["ts"]["acc"] == res["dac"]["acc"]
    assert res["dac"]["ece"] != res["raw"]["ece"]
    for v in ("raw", "ts", "dac"):
        assert (tmp_path / f"reliability_novel_{v}.png").read_bytes()[:4] == b"\x89PNG"
    assert set(ev.evaluate_split(z, y, None, None)) == {"raw"}


# --------------------------------------------------------------------------------------- result files
def test_atomic_writer_leaves_no_file_when_write_fails(tmp_path):
    path = tmp_path / "results.json"
    with pytest.raises(TypeError, match="cannot write"):
        ev.write_json_atomic(path, {"metrics": {"acc": 1.0}, "bad": object(), "complete": True})
    assert list(tmp_path.iterdir()) == []  # neither results.json nor the temporary file
    ev.write_json_atomic(path, {"old": True})
    with pytest.raises(TypeError):
        ev.write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"old": True} and len(list(tmp_path.iterdir())) == 1


def test_atomic_writer_killed_before_rename(tmp_path, monkeypatch):
    def boom(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(ev.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        ev.write_json_atomic(tmp_path / "results.json", {"complete": True})
    assert list(tmp_path.iterdir()) == []


def test_write_results_record(tmp_path):
    import argparse
    args = argparse.Namespace(dataset="demo_shapes", protocol="b2n", seed=2, shots=16, calib="ours",
                              backbone="ViT-B/16", root=tmp_path)
    metrics = {"base": {"raw": {"acc": np.float64(90.0)}}}
    path = ev.write_results(tmp_path / "run", method="coop", args=args, metrics=metrics, temperature=1.5,
                            timings={"train_s": 3.0}, extra={"n_params": 8192})
    rec = json.loads(path.read_text())
    assert rec["complete"] is True and rec["demo"] is True and rec["method"] == "coop"
    assert (rec["dataset"], rec["protocol"], rec["seed"], rec["shots"], rec["calib"]) == ("demo_shapes", "b2n", 2, 16, "ours")
    assert rec["args"]["root"] == str(tmp_path) and rec["metrics"]["base"]["raw"]["acc"] == 90.0
    assert rec["n_params"] == 8192 and set(rec["code"]) == {"commit", "dirty"}
    assert rec["temperature"] == 1.5 and rec["ts_fit_n"] is None  # a plain float carries no fit size
    ev.write_results(tmp_path / "run", method="coop", args=args, metrics=metrics,
                     temperature=ev.Temperature(1.5, fit_n=40), timings={})
    rec = json.loads(path.read_text())
    assert rec["temperature"] == 1.5 and rec["ts_fit_n"] == 40


def test_code_version(monkeypatch):
    v = ev.code_version()
    assert v["commit"] is None or (len(v["commit"]) == 40 and int(v["commit"], 16) >= 0)
    monkeypatch.setenv("PATH", "")  # no git executable
    assert ev.code_version() == {"commit": None, "dirty": None}


# -------------------------------------------------------------------------------------------- summary
def fake_run(root, method, calib, dataset, seed, metrics, protocol="b2n", demo=False, complete=True):
    d = root / protocol / method / calib / dataset / f"seed{seed}"
    d.mkdir(parents=True)
    rec = {"method": method, "calib": calib, "dataset": dataset, "seed": seed, "protocol": protocol,
           "demo": demo, "metrics": metrics}
    if complete:
        rec["complete"] = True
    (d / "results.json").write_text(json.dumps(rec))


def b2n_metrics(base_acc, novel_acc, base_ece, novel_ece):
    split = lambda acc, ece: {v: {"acc": acc, "ece": ece + i} for i, v in enumerate(("raw", "ts", "dac"))}
    return {"base": split(base_acc, base_ece), "novel": split(novel_acc, novel_ece)}


def md_table(text, title):
    """{(method, calib, variant): {column: cell}} of the Markdown table under the heading containing title."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("###") and title in l)
    header = [c.strip() for c in lines[start + 2].strip("|").split("|")]
    table = {}
    for line in lines[start + 4:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[tuple(cells[:3])] = dict(zip(header[3:], cells[3:]))
    return table


def test_summarize_tables_missing_and_incomplete(tmp_path):
    for seed, off in ((1, 0.0), (2, 2.0)):
        for i, ds in enumerate(("dsA", "dsB", "dsC")):
            fake_run(tmp_path, "coop", "none", ds, seed, b2n_metrics(80 + i + off, 60 + i + off, 5 + off, 10))
    fake_run(tmp_path, "coop", "ours", "dsA", 1, b2n_metrics(90, 70, 2, 3))
    fake_run(tmp_path, "coop", "ours", "dsA", 2, b2n_metrics(92, 72, 2, 3))
    fake_run(tmp_path, "coop", "ours", "dsB", 1, b2n_metrics(85, 65, 2, 3))  # dsB seed 2 and dsC missing
    fake_run(tmp_path, "coop", "ours", "dsC", 3, b2n_metrics(0, 0, 0, 0), complete=False)
    (tmp_path / "b2n" / "broken").mkdir()
    (tmp_path / "b2n" / "broken" / "results.json").write_text('{"complete": tr')
    text = ev.summarize(tmp_path)
    assert text == (tmp_path / "summary.md").read_text()

    acc = md_table(text, "b2n: base acc (%), mean over seeds")
    assert acc[("coop", "none", "raw")] == {"dsA": "81.00", "dsB": "82.00", "dsC": "83.00", "average": "82.00"}
    assert acc[("coop", "ours", "raw")] == {"dsA": "91.00", "dsB": "85.00*", "dsC": "-", "average": "-"}
    std = md_table(text, "b2n: base acc (%), std over seeds")
    assert std[("coop", "none", "ts")] == {"dsA": "1.00", "dsB": "1.00", "dsC": "1.00", "average": "1.00"}
    assert std[("coop", "ours", "ts")]["dsB"] == "0.00" and std[("coop", "ours", "ts")]["dsC"] == "-"
    h = md_table(text, "b2n: H (%), mean over seeds")
    assert h[("coop", "none", "raw")]["dsA"] == f"{2 * 81 * 61 / 142:.2f}"  # H of the mean accuracies
    assert h[("coop", "none", "raw")]["average"] == f"{2 * 82 * 62 / 144:.2f}"
    ece = md_table(text, "b2n: novel ece (%), mean over seeds")
    assert ece[("coop", "none", "dac")]["dsB"] == "12.00" and ece[("coop", "ours", "ts")]["dsA"] == "4.00"
    assert list(acc) == [("coop", "none", v) for v in ("raw", "ts", "dac")] + [("coop", "ours", v) for v in ("raw", "ts", "dac")]
    overview = md_table(text, "b2n: overview, average over 3 dataset(s)")
    assert overview[("coop", "none", "raw")] == {"base acc": "82.00", "novel acc": "62.00",
                                                 "H": f"{2 * 82 * 62 / 144:.2f}", "base ece": "6.00", "novel ece": "10.00"}
    assert overview[("coop", "ours", "raw")]["base acc"] == "-"  # incomplete rows have no average

    assert "- coop / ours (raw, ts, dac): dsB seed 2; dsC seed 1; dsC seed 2" in text
    assert "coop / none" not in text.split("Missing runs (shown as -):")[1].split("###")[0]
    skipped = text.split("## Skipped result files")[1]
    assert "dsC/seed3/results.json: incomplete" in skipped and "broken/results.json: unreadable" in skipped
    assert "DEMO" not in text

    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if (r["table"], r["stat"], r["calib"], r["variant"]) == ("base acc", "mean", "ours", "raw"))
    assert (row["dsA"], row["dsB"], row["dsC"], row["average"]) == ("91.00", "85.00", "-", "-")
    assert (tmp_path / "summary_radar.png").read_bytes()[:4] == b"\x89PNG"


def test_summarize_cross_dataset_and_demo(tmp_path):
    targets = {"imagenet": 70.0, "caltech101": 90.0, "dtd": 40.0}
    for seed in (1, 2):
        metrics = {t: {"raw": {"acc": a + seed, "ece": 1.0}, "ts": {"acc": a + seed, "ece": 2.0}} for t, a in targets.items()}
        fake_run(tmp_path, "coop", "none", "imagenet", seed, metrics, protocol="xd")
    fake_run(tmp_path, "coop", "none", "demo_shapes", 1, b2n_metrics(90, 10, 1, 2), demo=True)
    fake_run(tmp_path, "coop", "none", "demo_shapes", 2, b2n_metrics(10, 90, 1, 2), demo=True)
    text = ev.summarize(tmp_path, write=False)
    assert not (tmp_path / "summary.md").exists()
    acc = md_table(text, "xd: acc (%), mean over seeds")
    # the average leaves out the training dataset (imagenet)
    assert acc[("coop", "none", "raw")] == {"imagenet": "71.50", "caltech101": "91.50", "dtd": "41.50", "average": "66.50"}
    assert "Trained on imagenet; the average is over the other targets" in text
    demo_titles = [l for l in text.splitlines() if l.startswith("###") and "b2n" in l]
    assert demo_titles and all("DEMO" in l for l in demo_titles)
    assert not any("DEMO" in l for l in text.splitlines() if l.startswith("###") and "xd" in l)
    # H of the mean accuracies (50, 50), not the mean of the per-seed H (18, 18); std over per-seed H
    assert md_table(text, "DEMO b2n: H (%), mean")[("coop", "none", "raw")]["demo_shapes"] == "50.00"
    assert md_table(text, "DEMO b2n: H (%), std")[("coop", "none", "raw")]["demo_shapes"] == "0.00"


def test_summarize_cli(tmp_path, capsys):
    fake_run(tmp_path, "coop", "none", "dsA", 1, b2n_metrics(80, 60, 5, 10))
    ev.main(["summarize", str(tmp_path), "--split", "novel"])
    out = capsys.readouterr().out
    assert "novel acc" in out and "base acc" not in out and (tmp_path / "summary.csv").exists()
    with pytest.raises(ev.UserError, match="no metric 'bogus'"):
        ev.summarize(tmp_path, metrics=["bogus"], write=False)
    with pytest.raises(ev.UserError, match="is not a directory") as e:
        ev.main(["summarize", str(tmp_path / "nope")])
    assert e.value.status == 2
