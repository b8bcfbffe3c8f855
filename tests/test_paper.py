"""The published tables (published/tcpt_tables.csv) and `eval.py summarize OUTPUT --paper`, on fabricated
result trees."""
import csv
import json
import math

import numpy as np
import pytest

import data
import eval as ev
from test_eval import fake_run, md_table


def run_metrics(base_acc, novel_acc, base_ece, novel_ece, base_conf=None, novel_conf=None, margin=(3.0, 2.0)):
    """metrics[split][variant] of one run: raw, ts and dac share the accuracy; ts adds 1 to the ECE, dac 2."""
    def split(acc, ece, conf):
        return {v: {"acc": acc, "ece": ece + i, "confidence": acc if conf is None else conf,
                    "margin_mean": margin[0], "margin_std": margin[1]} for i, v in enumerate(("raw", "ts", "dac"))}
    return {"base": split(base_acc, base_ece, base_conf), "novel": split(novel_acc, novel_ece, novel_conf)}


def real_run(root, method, calib, dataset, seed, metrics, **kw):
    fake_run(root, method, calib, dataset, seed, metrics, protocol="base2new", **kw)


PUB = ev.load_published()


def published(split, method, calib, metric, col):
    return PUB[(split, method, calib, metric)][col]


# ------------------------------------------------------------------------------------------ the data file
def test_published_table_has_every_dataset_and_the_average_of_each_row():
    with open(ev.PUBLISHED, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["split", "method", "calib", "metric", *data.BASE_TO_NOVEL, "average", "note"]
    assert len(rows) == len(PUB) == 79  # 2 splits x (zeroshot + 3 families x 6 calibs) x 2 metrics + 3 DAC rows
    for row in rows:
        assert all(re_number(row[c]) for c in [*data.BASE_TO_NOVEL, "average"]), row
    assert {k[2] for k in PUB} == {"none", "mbls", "ts", "dac", "zs_norm", "penalty", "ours"}
    assert {k for k in PUB if k[2] == "dac"} == {("novel", m, "dac", "ece") for m in ("coop", "maple", "kgcoop")}


def re_number(text):
    """A number as the paper prints it: two decimals."""
    whole, _, frac = text.partition(".")
    return whole.isdigit() and len(frac) == 2 and frac.isdigit()


def test_published_values_are_the_transcribed_ones():
    assert published("base", "coop", "none", "acc", "average") == 81.00
    assert published("base", "coop", "none", "ece", "fgvc_aircraft") == 25.70
    assert published("novel", "coop", "ours", "ece", "average") == 4.79
    assert published("novel", "coop", "ours", "acc", "oxford_pets") == 97.36
    assert published("base", "zeroshot", "none", "acc", "eurosat") == 57.00
    assert published("novel", "maple", "dac", "ece", "imagenet") == 2.11
    assert published("base", "maple", "mbls", "ece", "imagenet") == 29.06
    assert published("novel", "kgcoop", "ts", "ece", "ucf101") == 6.43
    assert published("base", "kgcoop", "ours", "acc", "average") == 80.34


def test_published_notes_say_where_the_source_is_inconsistent():
    for key, row in PUB.items():
        mean = np.mean([row[c] for c in data.BASE_TO_NOVEL])
        # a printed average that is not the mean of its 11 numbers (beyond rounding) is noted, with the mean
        assert (abs(mean - row["average"]) > 0.015) == ("printed average" in row["note"]), key
        if "printed average" in row["note"]:
            assert f"({mean:.2f})" in row["note"]
    copied = {k for k, row in PUB.items() if "copied from the novel row" in row["note"]}
    assert copied == {("base", "kgcoop", "zs_norm", "acc"), ("base", "kgcoop", "zs_norm", "ece")}


def test_a_damaged_published_table_is_a_user_error(tmp_path):
    lines = ev.PUBLISHED.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([lines[0], lines[1].replace("72.40", "", 1)]) + "\n")
    with pytest.raises(ev.UserError, match="line 2 of the published table lacks a number.*git checkout"):
        ev.load_published(bad)
    bad.write_text("\n".join([lines[0].replace("imagenet,", ""), lines[1]]) + "\n")
    with pytest.raises(ev.UserError, match="columns"):
        ev.load_published(bad)
    bad.write_text("\n".join([lines[0], lines[1], lines[1]]) + "\n")
    with pytest.raises(ev.UserError, match="line 3 .* repeats base/zeroshot/none/acc"):
        ev.load_published(bad)


# ------------------------------------------------------------------------------------------ the flag
def test_flag_two_standard_errors_one_seed_zero_variance_and_nothing_published():
    # mean 10, sample std 1 over 4 seeds: SE 0.5, so the band is 10 +- 1, widened by the rounding 0.005
    assert ev._flag(10.0, 1.0, 4, 11.0) == "" and ev._flag(10.0, 1.0, 4, 8.996) == ""
    assert ev._flag(10.0, 1.0, 4, 11.01) == ">2 SE" and ev._flag(10.0, 1.0, 4, 8.99) == ">2 SE"
    assert ev._flag(10.0, float("nan"), 1, 50.0) == "1 seed"
    assert ev._flag(10.0, 0.0, 3, 10.004) == ""  # zero spread: equal to the printed digits
    assert ev._flag(10.0, 0.0, 3, 10.01) == ">2 SE"  # zero spread: any printed difference
    assert ev._flag(10.0, 1.0, 4, None) == ""
    cell = ev._seed_cell([9.0, 10.0, 11.0, 10.0], 11.5)
    assert cell["mean"] == 10.0 and math.isclose(cell["sd"], np.std([9, 10, 11, 10], ddof=1))  # sample std
    assert cell["n"] == 4 and cell["diff"] == -1.5 and cell["flag"] == ">2 SE"


# ------------------------------------------------------------------------------------------ the join
@pytest.fixture
def tree(tmp_path):
    """coop none on dtd (3 seeds) and eurosat (seeds 1, 2), coop ours and mdca on dtd, zero-shot on dtd with
    one seed, MaPLe none on dtd with zero spread, and a dataset the paper lacks."""
    for seed, off in ((1, -1.0), (2, 0.0), (3, 1.0)):
        real_run(tmp_path, "coop", "none", "dtd", seed, run_metrics(76.0 + off, 53.0 + off, 12.0, 20.0, 70 + off, 65 + off))
        real_run(tmp_path, "coop", "ours", "dtd", seed, run_metrics(70.0 + off, 48.0, 2.4, 9.3, 69 + off, 50))
        real_run(tmp_path, "coop", "mdca", "dtd", seed, run_metrics(76.0, 53.0, 5.0, 9.0))
        real_run(tmp_path, "maple", "none", "dtd", seed, run_metrics(79.63, 50.0, 4.18, 12.16))
    for seed, acc in ((1, 90.0), (2, 92.0)):
        real_run(tmp_path, "coop", "none", "eurosat", seed, run_metrics(acc, 64.0, 2.0, 12.0, acc - 2, 70.0))
    real_run(tmp_path, "zeroshot", "none", "dtd", 1, run_metrics(53.0, 60.6, 4.53, 6.86))
    real_run(tmp_path, "coop", "none", "dsA", 1, run_metrics(50.0, 50.0, 1.0, 1.0))
    return tmp_path


def test_join_keys_post_hoc_variants_and_missing_entries(tree):
    records, _ = ev.load_results(tree)
    kept, left_out = ev._paper_records(records)
    assert left_out == ["runs of datasets the paper does not report: 1"]
    comp = ev.paper_comparison(kept, PUB)
    # ours rows the paper reports; ts and dac are compared only as variants of the none runs
    assert list(comp) == [("coop", "none", "raw"), ("coop", "none", "ts"), ("coop", "none", "dac"),
                          ("coop", "ours", "raw"), ("maple", "none", "raw"), ("maple", "none", "ts"),
                          ("maple", "none", "dac"), ("zeroshot", "none", "raw")]
    dtd = comp[("coop", "none", "raw")][("base", "acc")]["dtd"]
    assert (dtd["mean"], dtd["n"], dtd["published"]) == (76.0, 3, 76.27) and math.isclose(dtd["diff"], -0.27)
    assert dtd["flag"] == ""  # sample std 1, SE 0.58: 0.27 is seed noise
    ts = comp[("coop", "none", "ts")][("novel", "ece")]["dtd"]
    assert ts["mean"] == 21.0 and ts["published"] == published("novel", "coop", "ts", "ece", "dtd")
    dac = comp[("coop", "none", "dac")]
    assert dac[("novel", "ece")]["dtd"]["published"] == published("novel", "coop", "dac", "ece", "dtd")
    assert dac[("base", "ece")]["dtd"]["published"] is None and dac[("novel", "acc")]["dtd"]["published"] is None
    assert comp[("coop", "ours", "raw")][("novel", "ece")]["dtd"]["published"] == published("novel", "coop", "ours", "ece", "dtd")

    # the average: ours over the datasets we ran, against the paper's numbers of the same two datasets
    avg = comp[("coop", "none", "raw")][("base", "acc")]["average"]
    assert avg["datasets"] == 2 and avg["mean"] == np.mean([76.0, 91.0])
    assert math.isclose(avg["published"], np.mean([published("base", "coop", "none", "acc", c) for c in ("dtd", "eurosat")]))
    assert avg["n"] == 2  # seeds 1 and 2 are on both datasets: per-seed averages 80.5, 83
    assert math.isclose(avg["sd"], np.std([(75 + 90) / 2, (76 + 92) / 2], ddof=1))


def test_report_flags_and_dashes(tree):
    text, compared = ev.paper_report(tree)
    assert compared and text == (tree / "paper.md").read_text()
    dtd = md_table(text, "coop / none / raw, against the paper's coop / none")
    # md_table keys rows by their first three cells: dataset, split, ours
    row = next(v for k, v in dtd.items() if k[:2] == ("dtd", "base"))
    assert row["acc: paper"] == "76.27" and row["acc: Δ"] == "-0.27" and row["ece: Δ"] == "-0.17 (>2 SE)"
    assert next(k for k in dtd if k[:2] == ("dtd", "base"))[2] == "76.00 ± 1.00 (n=3)"
    dac = md_table(text, "coop / none / dac, against the paper's coop / dac")
    base = next(v for k, v in dac.items() if k[:2] == ("dtd", "base"))
    assert base["acc: paper"] == base["acc: Δ"] == base["ece: paper"] == base["ece: Δ"] == "-"
    zs = md_table(text, "zeroshot / none / raw, against the paper's zeroshot / none")
    zs_base = next((k, v) for k, v in zs.items() if k[:2] == ("dtd", "base"))
    assert zs_base[0][2] == "53.00 (n=1)" and zs_base[1]["acc: Δ"] == "+0.00 (1 seed)"
    maple = md_table(text, "maple / none / raw, against the paper's maple / none")
    m_base = next(v for k, v in maple.items() if k[:2] == ("dtd", "base"))
    assert m_base["acc: Δ"] == "+0.00" and m_base["ece: Δ"] == "+0.00"  # zero spread, equal: no flag
    m_novel = next(v for k, v in maple.items() if k[:2] == ("dtd", "novel"))
    assert m_novel["acc: Δ"] == "-8.47 (>2 SE)"  # zero spread, different: flagged
    assert "coop / mdca (raw, ts, dac); coop / ours (ts, dac)" in text.split("Not in the paper's tables: ")[1]
    assert "Left out: runs of datasets the paper does not report: 1." in text
    # the data file's notes on a published row stand below the table that uses it
    coop_part = text.split("### coop / none / raw, against")[1].split("###")[0]
    maple_part = text.split("### maple / none / raw, against")[1].split("###")[0]
    assert "- the paper's" not in coop_part
    assert "- the paper's base acc row: the printed average is not the mean of the 11 numbers (81.80)" in maple_part

    overview = md_table(text, "ours against the paper: overview")
    assert overview[("coop", "none", "raw")]  # rows keyed by method, calib, variant; base then novel


def test_overview_one_line_per_row_and_split(tree):
    text, _ = ev.paper_report(tree, write=False)
    lines = text.split("### ours against the paper: overview")[1].split("\n\n")[1].splitlines()[2:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert [c[:5] for c in cells[:2]] == [["coop", "none", "raw", "base", "2"], ["coop", "none", "raw", "novel", "2"]]
    pub = np.mean([published("base", "coop", "none", "acc", c) for c in ("dtd", "eurosat")])
    assert cells[0][6] == f"{pub:.2f}" and cells[0][5].startswith(f"{np.mean([76.0, 91.0]):.2f} ± ")
    assert not (tree / "paper.md").exists()  # write=False


def test_files_written(tree):
    ev.paper_report(tree)
    with open(tree / "paper.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ev.PAPER_CSV_FIELDS
    ts = next(r for r in rows if (r["calib"], r["variant"], r["split"], r["metric"], r["dataset"])
              == ("none", "ts", "novel", "ece", "dtd") and r["method"] == "coop")
    assert (ts["paper_calib"], ts["ours_mean"], ts["published"], ts["n_seeds"]) == ("ts", "21.00", "20.21", "3")
    dac = next(r for r in rows if (r["method"], r["variant"], r["split"], r["metric"], r["dataset"])
               == ("coop", "dac", "base", "ece", "dtd"))
    assert dac["published"] == dac["diff"] == "-" and dac["flag"] == ""
    zs = next(r for r in rows if r["method"] == "zeroshot" and r["dataset"] == "dtd")
    assert zs["ours_std"] == "-" and zs["flag"] == "1 seed"
    with open(tree / "paper_analysis.csv") as f:
        analysis = list(csv.DictReader(f))
    avg = next(r for r in analysis if (r["method"], r["calib"], r["split"], r["dataset"]) == ("coop", "none", "base", "average"))
    assert avg["datasets"] == "2" and avg["conf_minus_acc"] == "-4.00"  # dtd -6, eurosat -2
    assert (tree / "paper_miscalibration.png").read_bytes()[:4] == b"\x89PNG"


def test_dual_miscalibration_table(tree):
    records, _ = ev.load_results(tree)
    analysis = ev.miscalibration(ev._paper_records(records)[0])
    none = analysis[("coop", "none")]
    assert none["base"]["dtd"]["gap"] == -6.0 and none["novel"]["dtd"]["gap"] == 12.0
    assert none["novel"]["eurosat"]["gap"] == 6.0
    text, _ = ev.paper_report(tree, write=False)
    table = md_table(text, "coop / none: confidence - accuracy and margins")
    base = next(v for k, v in table.items() if k[0] == "base")
    novel_key, novel = next((k, v) for k, v in table.items() if k[0] == "novel")
    assert novel_key[2] == "2 of 2" and next(k for k in table if k[0] == "base")[2] == "0 of 2"
    assert base["conf - acc"] == "-4.00" and novel["conf - acc"] == "9.00"
    assert base["margin mean"] == "3.00" and base["margin std"] == "2.00" and base["ece"] == "7.00"


def test_demo_runs_are_left_out_and_a_demo_tree_gets_one_line(tmp_path, capsys):
    for ds in data.DEMO_DATASETS:
        real_run(tmp_path, "coop", "none", ds, 1, run_metrics(90, 50, 3, 9), demo=True)
    text, compared = ev.paper_report(tmp_path)
    assert not compared and "\n" not in text and "ignored for the demo datasets" in text
    assert "demo_shapes, demo_colours, demo_patterns" in text
    assert not list(tmp_path.glob("paper*"))
    ev.main(["summarize", str(tmp_path), "--paper"])
    out = capsys.readouterr().out
    assert "--paper: ignored for the demo datasets" in out
    assert "published" not in (tmp_path / "summary.md").read_text()
    # next to real runs the demo runs are left out, and the demo summary tables stay as they were
    real_run(tmp_path, "coop", "none", "dtd", 1, run_metrics(76, 53, 12, 20))
    text, compared = ev.paper_report(tmp_path)
    assert compared and "Left out: demo world runs (synthetic datasets, not the paper's): 3." in text
    assert "demo_shapes" not in text
    summary = (tmp_path / "summary.md").read_text()
    assert "DEMO base2new" in summary and "published" not in summary and "against the paper" not in summary


def test_other_settings_are_left_out(tmp_path):
    real_run(tmp_path, "coop", "none", "dtd", 1, run_metrics(76, 53, 12, 20))
    fake_run(tmp_path, "coop", "none", "imagenet", 1, {"dtd": {"raw": {"acc": 40, "ece": 5}}}, protocol="xd")
    text, compared = ev.paper_report(tmp_path)
    assert compared and "Left out: runs of another protocol than base2new: 1." in text
    nothing = tmp_path / "xd_only"
    fake_run(nothing, "coop", "none", "imagenet", 1, {"dtd": {"raw": {"acc": 40, "ece": 5}}}, protocol="xd")
    text, compared = ev.paper_report(nothing)
    assert not compared and text.startswith("--paper: nothing to compare")


def test_shots_and_backbone_other_than_the_papers_are_left_out(tmp_path):
    real_run(tmp_path, "coop", "none", "dtd", 1, run_metrics(76, 53, 12, 20))
    rec_dir = tmp_path / "base2new" / "coop" / "none" / "dtd" / "seed1"
    rec = json.loads((rec_dir / "results.json").read_text())
    for seed, extra in ((2, {"shots": 4}), (3, {"backbone": "ViT-B/32"}), (4, {"shots": 16, "backbone": "ViT-B/16"})):
        d = rec_dir.parent / f"seed{seed}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps({**rec, "seed": seed, **extra}))
    text, _ = ev.paper_report(tmp_path, write=False)
    assert "Left out: runs with other shots or backbone than the paper's 16 shots, ViT-B/16: 2." in text
    assert "76.00 ± 0.00 (n=2)" in text


def test_cli_prints_the_comparison_and_repeats_its_overview_last(tree, capsys):
    ev.main(["summarize", str(tree), "--paper"])
    out = capsys.readouterr().out
    assert out.count("### ours against the paper: overview") == 2
    assert out.rindex("### ours against the paper: overview") > out.rindex("### base2new: overview")
    assert "paper.md, paper.csv, paper_analysis.csv, paper_miscalibration.png" in out.splitlines()[-1]
    ev.main(["summarize", str(tree)])
    assert "against the paper" not in capsys.readouterr().out
