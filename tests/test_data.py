"""Tests for data.py on small fabricated dataset trees with real (tiny) image files."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import warnings
from collections import defaultdict

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import data
from data import Datum, DatasetError, DatasetSplits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- fabrication helpers


def _image_bytes(fmt: str = "PNG", size=(8, 8), colour=(200, 30, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


PNG, JPEG = _image_bytes("PNG"), _image_bytes("JPEG")


def _write(path: str, payload: bytes = JPEG) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(payload)
    return path


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def make_split_tree(root, key: str, n_classes: int, sizes=(2, 1, 1)) -> dict:
    """A CoOp split-file dataset: n classes named "class_<i>", sizes[s] images per class and split.
    Entries are interleaved across classes (as in real split files). Returns the raw split dict."""
    info = data.DATASETS[key]
    folder = os.path.join(root, info.folder)
    raw = {}
    for split, k in zip(("train", "val", "test"), sizes):
        raw[split] = [[f"c{label:03d}/{split}_{j}.jpg", label, f"class_{label}"]
                      for j in range(k) for label in range(n_classes)]
        for rel, _, _ in raw[split]:
            _write(os.path.join(folder, info.images, rel))
    _write_text(os.path.join(folder, info.split_file), json.dumps(raw))
    return raw


def _wnids(n: int = 1000) -> list[str]:
    return [f"n{7 * i + 10:08d}" for i in range(n)]  # already sorted


def _classnames_txt(wnids) -> str:
    shuffled = list(wnids)
    random.Random(0).shuffle(shuffled)  # file order must not matter
    return "".join(f"{w} thing {int(w[1:])}\n" for w in shuffled)


def _name(wnid: str) -> str:
    return f"thing {int(wnid[1:])}"


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """ImageNet (1 val and 1 train image per class, 2 in classes 0-2), -Sketch, -V2 (1000 classes) and -A/-R (200 classes)."""
    root = str(tmp_path_factory.mktemp("data"))
    wnids, txt = _wnids(), _classnames_txt(_wnids())
    for i, w in enumerate(wnids):
        for name in ("b.JPEG", "a.JPEG")[i >= 3:]:  # 2 images in the first 3 classes, written out of order
            _write(os.path.join(root, "imagenet/images/train", w, name))
        _write(os.path.join(root, "imagenet/images/val", w, "v.JPEG"))
        _write(os.path.join(root, "imagenet-sketch/images", w, "s.JPEG"))
    _write(os.path.join(root, "imagenet/images/train", wnids[0], ".DS_Store"), b"junk")  # hidden: skipped
    for i in range(1000):
        _write(os.path.join(root, "imagenetv2/imagenetv2-matched-frequency-format-val", str(i), "x.jpeg"))
    subsets = {"imagenet-adversarial/imagenet-a": wnids[3::5], "imagenet-rendition/imagenet-r": wnids[1::5]}
    for sub, chosen in subsets.items():
        for w in chosen:
            _write(os.path.join(root, sub, w, "0.jpg"))
        _write_text(os.path.join(root, sub, "README.txt"), "not a class")  # a file, not a class folder
    for folder in ("imagenet", "imagenet-sketch", "imagenetv2", "imagenet-adversarial", "imagenet-rendition"):
        _write_text(os.path.join(root, folder, "classnames.txt"), txt)
    return root


# ----------------------------------------------------------------------------- readers


SPLIT_KEYS = [k for k, info in data.DATASETS.items() if info.layout == "split"]


@pytest.mark.parametrize("key", SPLIT_KEYS)
def test_split_file_layouts(tmp_path, key):
    n = data.DATASETS[key].n_classes or 3
    raw = make_split_tree(tmp_path, key, n)
    splits = data.load_dataset(key, tmp_path)
    image_dir = os.path.join(str(tmp_path), data.DATASETS[key].folder, data.DATASETS[key].images)
    for split in ("train", "val", "test"):
        expected = [Datum(os.path.normpath(os.path.join(image_dir, rel)), label, name)
                    for rel, label, name in raw[split]]
        got = [Datum(os.path.normpath(d.impath), d.label, d.classname) for d in getattr(splits, split)]
        assert got == expected  # same items, same order, absolute paths
        assert all(os.path.isabs(d.impath) and os.path.isfile(d.impath) for d in getattr(splits, split))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2 * n, n, n)
    assert splits.classnames == [f"class_{i}" for i in range(n)]


def test_split_file_names_and_folders():
    expected = {"caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
                "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
                "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
                "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
                "food101": ("food-101", "images", "split_zhou_Food101.json"),
                "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
                "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
                "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
                "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
                "demo_shapes": ("demo_shapes", "images", "split_zhou_DemoShapes.json"),
                "demo_colours": ("demo_colours", "images", "split_zhou_DemoColours.json"),
                "demo_patterns": ("demo_patterns", "images", "split_zhou_DemoPatterns.json")}
    assert {k: (i.folder, i.images, i.split_file) for k, i in data.DATASETS.items() if i.layout == "split"} == expected
    assert len(data.BASE_TO_NOVEL) == 11 and len(data.XD_TARGETS) == 10 and "imagenet" not in data.XD_TARGETS
    assert data.DG_TARGETS == ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]


def _make_aircraft(root, n=100):
    folder = os.path.join(root, "fgvc_aircraft")
    variants = [f"Model {i}-{i % 7}" if i % 2 else f"A{i}" for i in range(n)]  # some with spaces
    _write_text(os.path.join(folder, "variants.txt"), "".join(v + "\n" for v in variants))
    lines = {}
    for s, split in enumerate(("train", "val", "test")):
        lines[split] = [(f"{s}{i:06d}", variants[(i * 37) % n]) for i in range(n)]
        _write_text(os.path.join(folder, f"images_variant_{split}.txt"),
                    "".join(f"{im} {v}\n" for im, v in lines[split]))
        for im, _ in lines[split]:
            _write(os.path.join(folder, "images", im + ".jpg"))
    return folder, variants, lines


def test_fgvc_aircraft_layout(tmp_path):
    folder, variants, lines = _make_aircraft(tmp_path)
    splits = data.load_dataset("fgvc_aircraft", tmp_path)
    assert splits.classnames == variants
    for split in ("train", "val", "test"):
        assert getattr(splits, split) == [
            Datum(os.path.join(folder, "images", im + ".jpg"), variants.index(v), v) for im, v in lines[split]]


def test_fgvc_aircraft_unknown_variant(tmp_path):
    folder, _, _ = _make_aircraft(tmp_path)
    with open(os.path.join(folder, "images_variant_val.txt"), "a") as f:
        f.write("9999999 Boeing 999\n")
    with pytest.raises(DatasetError, match="line 101.*Boeing 999"):
        data.load_dataset("fgvc_aircraft", tmp_path)


def test_imagenet_layout(imagenet_root):
    splits = data.load_dataset("imagenet", imagenet_root)
    wnids = _wnids()
    assert splits.classnames == [_name(w) for w in wnids]  # label = sorted wnid folder index
    assert len(splits.train) == 1003 and len(splits.test) == 1000
    train_dir = os.path.join(imagenet_root, "imagenet/images/train")
    assert splits.train[:3] == [Datum(os.path.join(train_dir, wnids[0], "a.JPEG"), 0, _name(wnids[0])),
                                Datum(os.path.join(train_dir, wnids[0], "b.JPEG"), 0, _name(wnids[0])),
                                Datum(os.path.join(train_dir, wnids[1], "a.JPEG"), 1, _name(wnids[1]))]
    assert splits.train[-1] == Datum(os.path.join(train_dir, wnids[-1], "a.JPEG"), 999, _name(wnids[-1]))
    assert splits.test[-1] == Datum(os.path.join(imagenet_root, "imagenet/images/val", wnids[-1], "v.JPEG"),
                                    999, _name(wnids[-1]))
    assert splits.val == splits.test  # ImageNet: val = test


def test_imagenet_sketch_and_v2(imagenet_root):
    names = [_name(w) for w in _wnids()]
    sketch = data.load_dataset("imagenet_sketch", imagenet_root)
    assert sketch.classnames == names and [d.label for d in sketch.test] == list(range(1000))
    assert sketch.train == [] and sketch.val == []
    v2 = data.load_dataset("imagenetv2", imagenet_root)
    assert v2.classnames == names
    v2_dir = os.path.join(imagenet_root, "imagenetv2/imagenetv2-matched-frequency-format-val")
    assert v2.test == [Datum(os.path.join(v2_dir, str(i), "x.jpeg"), i, names[i]) for i in range(1000)]


@pytest.mark.parametrize("key,folder,offset", [("imagenet_a", "imagenet-adversarial/imagenet-a", 3),
                                               ("imagenet_r", "imagenet-rendition/imagenet-r", 1)])
def test_imagenet_a_r_mapping(imagenet_root, key, folder, offset):
    imagenet = data.load_dataset("imagenet", imagenet_root)
    variant = data.load_dataset(key, imagenet_root)
    chosen = _wnids()[offset::5]
    assert len(variant.classnames) == 200 and len(variant.test) == 200
    for label, d in enumerate(variant.test):  # relabelled 0..199 in sorted wnid order
        wnid = chosen[label]
        assert d == Datum(os.path.join(imagenet_root, folder, wnid, "0.jpg"), label, _name(wnid))
        # the same class as ImageNet's label for that wnid
        assert imagenet.classnames[5 * label + offset] == variant.classnames[label]


# ----------------------------------------------------------------------------- clear errors

README = "docs/datasets.md"


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder") as e:
        data.load_dataset("caltech101", tmp_path)
    assert os.path.join(str(tmp_path), "caltech-101") in str(e.value) and README in str(e.value)


def test_missing_split_file_and_image_folder(tmp_path):
    os.makedirs(tmp_path / "dtd" / "images")
    with pytest.raises(DatasetError) as e:
        data.load_dataset("dtd", tmp_path)
    assert os.path.join(str(tmp_path), "dtd", "split_zhou_DescribableTextures.json") in str(e.value)
    assert README in str(e.value)
    _write_text(str(tmp_path / "eurosat" / "split_zhou_EuroSAT.json"), "{}")
    with pytest.raises(DatasetError, match="2750") as e:
        data.load_dataset("eurosat", tmp_path)
    assert README in str(e.value)


def test_missing_image(tmp_path):
    make_split_tree(tmp_path, "demo_shapes", 3)
    gone = os.path.join(str(tmp_path), "demo_shapes", "images", "c001", "test_0.jpg")
    os.remove(gone)
    with pytest.raises(DatasetError) as e:
        data.load_dataset("demo_shapes", tmp_path)
    assert gone in str(e.value) and README in str(e.value)


def _demo_with(tmp_path, edit) -> None:
    raw = make_split_tree(tmp_path, "demo_shapes", 3)
    edit(raw)
    _write_text(os.path.join(str(tmp_path), "demo_shapes", "split_zhou_DemoShapes.json"), json.dumps(raw))


@pytest.mark.parametrize("edit,message", [
    (lambda raw: raw["test"].append(["c000/train_0.jpg", 7, "seven"]), "out of range"),  # gap 3..6
    (lambda raw: raw["test"].append(["c000/train_0.jpg", -1, "negative"]), "out of range"),
    (lambda raw: raw["val"][0].__setitem__(2, "another name"), "two class names"),
    (lambda raw: raw["val"].append(["c000/train_0.jpg", 3, "class_1"]), "two labels"),
    (lambda raw: raw["train"][0].__setitem__(1, "0"), "integer label"),
    (lambda raw: raw.pop("val"), "'train', 'val', 'test'"),
])
def test_bad_split_file_rejected(tmp_path, edit, message):
    _demo_with(tmp_path, edit)
    with pytest.raises(DatasetError, match=message):
        data.load_dataset("demo_shapes", tmp_path)


def test_wrong_class_count(tmp_path):
    make_split_tree(tmp_path, "eurosat", 9)
    with pytest.raises(DatasetError, match="9 classes, expected 10"):
        data.load_dataset("eurosat", tmp_path)


def test_variant_errors(tmp_path, imagenet_root):
    os.makedirs(tmp_path / "imagenet-adversarial" / "imagenet-a" / "n99999999")
    _write(str(tmp_path / "imagenet-adversarial" / "imagenet-a" / "n99999999" / "0.jpg"))
    with pytest.raises(DatasetError, match="classnames.txt") as e:
        data.load_dataset("imagenet_a", tmp_path)
    assert README in str(e.value)
    _write_text(str(tmp_path / "imagenet-adversarial" / "classnames.txt"), "n00000001 cat\n")
    with pytest.raises(DatasetError, match="n99999999"):
        data.load_dataset("imagenet_a", tmp_path)
    os.makedirs(tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / "1")
    _write_text(str(tmp_path / "imagenetv2" / "classnames.txt"), "n1 a\nn2 b\n")
    with pytest.raises(DatasetError, match=r"missing \['0'\]"):
        data.load_dataset("imagenetv2", tmp_path)
    with pytest.raises(data.UserError, match="unknown dataset"):
        data.load_dataset("imagenet21k", imagenet_root)


def test_unreadable_image_names_file(tmp_path):
    make_split_tree(tmp_path, "demo_colours", 2)
    splits = data.load_dataset("demo_colours", tmp_path)
    bad = splits.train[1].impath
    _write(bad, b"this is not an image")
    with pytest.raises(DatasetError, match="cannot read image") as e:
        next(iter(data.test_loader(splits.train, 8, device="cpu")))
    assert bad in str(e.value)
    with pytest.raises(DatasetError, match="cannot read image") as e:
        data.TrainImages(splits.train, 8, 2, "cpu", seed=0)
    assert bad in str(e.value)


# ----------------------------------------------------------------------------- few-shot draw


def reference_draw(train, val, shots, seed):
    """Independent re-implementation of the public recipe with the module-level RNG."""
    random.seed(seed)
    drawn = []
    for items, k in ((train, shots), (val, min(shots, 4))):
        by_label = defaultdict(list)
        for d in items:
            by_label[d.label].append(d)
        chosen = []
        for group in by_label.values():
            chosen.extend(random.sample(group, k) if len(group) >= k else group)
        drawn.append(chosen)
    return drawn


def _pool(split: str, sizes: dict[int, int]) -> list[Datum]:
    """Labels interleaved in a non-sorted order of first appearance; some classes smaller than shots."""
    out = []
    for j in range(max(sizes.values())):
        out += [Datum(f"/d/{split}/{label}/{j}.jpg", label, f"c{label}") for label in sizes if j < sizes[label]]
    return out


TRAIN = _pool("train", {3: 40, 0: 16, 2: 5, 1: 23, 4: 17})
VAL = _pool("val", {1: 9, 3: 4, 0: 2, 2: 7, 4: 30})


@pytest.mark.parametrize("shots,seed", [(16, 1), (16, 2), (16, 3), (4, 1), (1, 7), (2, 0)])
def test_few_shot_matches_reference(shots, seed):
    train_fs, val_fs = data.few_shot(TRAIN, VAL, shots, seed)
    assert [train_fs, val_fs] == reference_draw(TRAIN, VAL, shots, seed)
    counts = defaultdict(int)
    for d in train_fs:
        counts[d.label] += 1
    sizes = {3: 40, 0: 16, 2: 5, 1: 23, 4: 17}
    assert counts == {label: min(n, shots) for label, n in sizes.items()}
    assert [d.label for d in train_fs][:min(shots, 5)] == [3] * min(shots, 5)  # first-appearance order


def test_val_draw_continues_the_stream():
    _, val_fs = data.few_shot(TRAIN, VAL, 16, 1)
    fresh = reference_draw(VAL, [], 4, 1)[0]  # val drawn from a freshly seeded RNG instead
    assert val_fs != fresh
    random.seed(1)
    for group in ([d for d in TRAIN if d.label == label] for label in (3, 0, 2, 1, 4)):
        if len(group) >= 16:
            random.sample(group, 16)
    assert val_fs[:4] == random.sample([d for d in VAL if d.label == 1], 4)


def test_few_shot_leaves_global_rng_alone():
    random.seed(5)
    expected = random.random()
    random.seed(5)
    data.few_shot(TRAIN, VAL, 16, 1)
    assert random.random() == expected


def test_few_shot_stable_across_processes():
    code = ("import json, data; from tests.test_data import TRAIN, VAL; "
            "t, v = data.few_shot(TRAIN, VAL, 16, 2); print(json.dumps([[d.impath for d in t], [d.impath for d in v]]))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    t, v = data.few_shot(TRAIN, VAL, 16, 2)
    assert json.loads(out.stdout) == [[d.impath for d in t], [d.impath for d in v]]


def test_few_shot_rejects_zero_shots():
    with pytest.raises(data.UserError, match="--shots"):
        data.few_shot(TRAIN, VAL, 0, 1)


def test_few_shot_record_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("CP_CACHE", str(tmp_path / "env"))
    first = data.few_shot_cached("demo_shapes", TRAIN, VAL, 16, 1)
    assert first == data.few_shot(TRAIN, VAL, 16, 1)
    path = tmp_path / "env" / "demo_shapes" / "shot_16-seed_1.json"
    stored = json.loads(path.read_text())
    assert (stored["dataset"], stored["shots"], stored["seed"], stored["rule"]) == ("demo_shapes", 16, 1, data.DRAW_RULE)
    assert set(stored) == {"dataset", "shots", "seed", "rule", "source", "train", "val"}
    assert [Datum(*e) for e in stored["train"]] == first[0] and [Datum(*e) for e in stored["val"]] == first[1]
    before = path.stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an up-to-date record is left alone, silently
        assert data.few_shot_cached("demo_shapes", TRAIN, VAL, 16, 1) == first
    assert path.stat().st_mtime_ns == before
    # an explicit argument wins over $CP_CACHE
    data.few_shot_cached("demo_shapes", TRAIN, VAL, 4, 2, cache_dir=tmp_path / "arg")
    assert (tmp_path / "arg" / "demo_shapes" / "shot_4-seed_2.json").is_file()


def test_few_shot_record_is_never_trusted(tmp_path):
    """The draw is recomputed every time: a record that differs from it (one swapped image, another seed, an
    older rule, another split file, a corrupt file) changes nothing and is replaced."""
    expected = data.few_shot(TRAIN, VAL, 16, 1)
    data.few_shot_cached("dtd", TRAIN, VAL, 16, 1, cache_dir=tmp_path)
    path = tmp_path / "dtd" / "shot_16-seed_1.json"
    good = json.loads(path.read_text())
    swapped = json.loads(json.dumps(good))
    unused = next(d for d in TRAIN if d not in expected[0] and d.label == expected[0][0].label)
    swapped["train"][0] = [unused.impath, unused.label, unused.classname]  # still an item of the train split
    for bad in [json.dumps(swapped), json.dumps(dict(good, seed=2)), json.dumps(dict(good, rule="old")),
                json.dumps(dict(good, source="0" * 64)), json.dumps({"train": good["train"]})]:
        path.write_text(bad)
        with pytest.warns(RuntimeWarning, match="differs from the draw"):
            assert data.few_shot_cached("dtd", TRAIN, VAL, 16, 1, cache_dir=tmp_path) == expected
        assert json.loads(path.read_text()) == good
    path.write_text('{"train": [')
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert data.few_shot_cached("dtd", TRAIN, VAL, 16, 1, cache_dir=tmp_path) == expected
    assert json.loads(path.read_text()) == good
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]  # atomic write cleaned up


# ----------------------------------------------------------------------------- base / novel


CLASS_TOTALS = {"imagenet": (1000, 500, 500), "caltech101": (100, 50, 50), "oxford_pets": (37, 19, 18),
                "stanford_cars": (196, 98, 98), "oxford_flowers": (102, 51, 51), "food101": (101, 51, 50),
                "fgvc_aircraft": (100, 50, 50), "sun397": (397, 199, 198), "dtd": (47, 24, 23),
                "eurosat": (10, 5, 5), "ucf101": (101, 51, 50)}


@pytest.mark.parametrize("key", data.BASE_TO_NOVEL)
def test_base_novel_counts(key):
    n, n_base, n_new = CLASS_TOTALS[key]
    assert data.DATASETS[key].n_classes == n
    items = [Datum(f"/x/{i}.jpg", label, f"c{label}") for i, label in enumerate(reversed(range(n)))]
    splits = DatasetSplits(items, items[:3], items, [f"c{i}" for i in range(n)])
    base, new = data.subsample_classes(splits, "base"), data.subsample_classes(splits, "new")
    assert (len(base.classnames), len(new.classnames)) == (n_base, n_new)
    assert base.classnames == [f"c{i}" for i in range(n_base)]
    assert new.classnames == [f"c{i}" for i in range(n_base, n)]
    assert sorted(d.label for d in base.test) == list(range(n_base))
    assert sorted(d.label for d in new.test) == list(range(n_new))
    assert all(new.classnames[d.label] == d.classname for d in new.test)
    assert data.subsample_classes(splits, "all") == splits


def test_subsample_uses_sorted_train_labels():
    train = [Datum("/a", 10, "ten"), Datum("/b", 4, "four"), Datum("/c", 7, "seven")]
    test = train + [Datum("/d", 4, "four")]
    splits = DatasetSplits(train, [], test, [f"n{i}" for i in range(11)])
    base = data.subsample_classes(splits, "base")  # labels 4, 7 -> 0, 1
    assert base.test == [Datum("/b", 0, "four"), Datum("/c", 1, "seven"), Datum("/d", 0, "four")]
    assert base.classnames == ["n4", "n7"]
    assert data.subsample_classes(splits, "new").test == [Datum("/a", 0, "ten")]
    with pytest.raises(ValueError):
        data.subsample_classes(splits, "novel")


def test_base_to_novel_draws_before_splitting(tmp_path):
    make_split_tree(tmp_path, "demo_patterns", 5, sizes=(6, 5, 3))
    full = data.load_dataset("demo_patterns", tmp_path)
    base, new = data.base_to_novel("demo_patterns", tmp_path, 4, 1, cache_dir=tmp_path / "cache")
    train_fs, val_fs = reference_draw(full.train, full.val, 4, 1)
    assert base.train == [Datum(d.impath, d.label, d.classname) for d in train_fs if d.label < 3]
    assert new.train == [Datum(d.impath, d.label - 3, d.classname) for d in train_fs if d.label >= 3]
    assert new.val == [Datum(d.impath, d.label - 3, d.classname) for d in val_fs if d.label >= 3]
    assert (len(base.test), len(new.test)) == (9, 6)
    assert new.classnames == ["class_3", "class_4"]


def test_imagenet_val_draw_comes_from_test(imagenet_root, tmp_path):
    fs = data.load_few_shot("imagenet", imagenet_root, 1, 1, cache_dir=tmp_path)
    assert len(fs.train) == 1000 and len(fs.val) == 1000 and len(fs.test) == 1000
    test = set(data.load_dataset("imagenet", imagenet_root).test)
    assert set(fs.val) == test
    with pytest.raises(DatasetError, match="no train split"):
        data.load_few_shot("imagenet_sketch", imagenet_root, 1, 1, cache_dir=tmp_path)


def test_protocol_splits(tmp_path):
    for key in data.DEMO_DATASETS:
        make_split_tree(tmp_path, key, 4, sizes=(3, 2, 2))
    cache = tmp_path / "cache"
    train, targets = data.protocol_splits("base2new", "demo_shapes", tmp_path, 2, 1, cache_dir=cache)
    assert list(targets) == ["base", "novel"] and train == targets["base"]
    assert (train, targets["novel"]) == data.base_to_novel("demo_shapes", tmp_path, 2, 1, cache_dir=cache)
    train, targets = data.protocol_splits("xd", "demo_shapes", tmp_path, 2, 1, cache_dir=cache)
    assert list(targets) == ["demo_shapes", "demo_colours", "demo_patterns"]
    assert train == targets["demo_shapes"] and len(train.classnames) == 4 and len(train.train) == 8
    assert targets["demo_colours"] == data.load_dataset("demo_colours", tmp_path)
    with pytest.raises(data.UserError, match="protocol"):
        data.protocol_splits("dg", "demo_shapes", tmp_path, 2, 1, cache_dir=cache)
    with pytest.raises(DatasetError, match="caltech-101"):  # xd from a real source needs every target
        make_split_tree(tmp_path, "eurosat", 10)
        data.protocol_splits("xd", "eurosat", tmp_path, 2, 1, cache_dir=cache)


def test_training_crop_follows_the_dataset(tmp_path):
    """Photos keep CoOp's RandomResizedCrop(scale=(0.08, 1)); the demo's 32-pixel pictures set 0.5, and the
    setting survives few-shot sampling and the base/novel split on its way to TrainImages."""
    make_split_tree(tmp_path, "demo_shapes", 4, sizes=(3, 2, 2))
    make_split_tree(tmp_path, "eurosat", 10)
    cache = tmp_path / "cache"
    demo_train, demo_targets = data.protocol_splits("base2new", "demo_shapes", tmp_path, 2, 1, cache_dir=cache)
    photo_train, _ = data.protocol_splits("base2new", "eurosat", tmp_path, 2, 1, cache_dir=cache)
    assert demo_train.min_crop == demo_targets["novel"].min_crop == 0.5 and photo_train.min_crop == 0.08
    for split, scale in ((demo_train, (0.5, 1.0)), (photo_train, (0.08, 1.0))):
        assert data.TrainImages(split.train, 8, 2, "cpu", 0, split.min_crop).scale == scale


# ----------------------------------------------------------------------------- templates


def test_templates():
    assert data.template("dtd", "coop") == "{} texture."
    assert data.template("dtd", "kgcoop") == "a photo of a {}, a type of texture."
    assert data.template("dtd", "prograd") == "a texture of {}."
    assert data.template("food101", "prograd") == "a type of food, a photo of {}."
    assert data.template("oxford_pets", "kgcoop") == "a photo of a {}, a type of pet."
    assert {data.template("eurosat", c) for c in data.COLUMNS} == {"a centered satellite photo of {}."}
    for key in data.DG_TARGETS + data.DEMO_DATASETS + ["imagenet", "sun397", "stanford_cars", "caltech101"]:
        assert {data.template(key, c) for c in data.COLUMNS} == {"a photo of a {}."}
    assert data.prompts("ucf101", ["Apply_Eye_Makeup"]) == ["a photo of a person doing Apply Eye Makeup."]
    assert data.clean_classname("great_white_shark") == "great white shark"
    with pytest.raises(ValueError, match="column"):
        data.template("dtd", "maple")
    t = data.IMAGENET_TEMPLATES
    assert len(t) == 80 and len(set(t)) == 80 and all(x.count("{}") == 1 for x in t)
    assert t[0] == "a bad photo of a {}." and t[-1] == "a tattoo of the {}."


# ----------------------------------------------------------------------------- transforms, loaders


def test_transforms_shape_and_normalisation():
    img = Image.new("RGB", (13, 10), (255, 0, 128))
    x = data.test_transform(8)(img)
    assert x.shape == (3, 8, 8)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(data.CLIP_MEAN)) / torch.tensor(data.CLIP_STD)
    assert torch.allclose(x, expected[:, None, None].expand(3, 8, 8), atol=1e-5)
    assert data.train_transform(8)(img).shape == (3, 8, 8)


def _noise_items(tmp_path, n=6) -> list[Datum]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        pixels = rng.integers(0, 256, (10 + i, 14 + 2 * i, 3), dtype=np.uint8)
        path = str(tmp_path / f"img{i}.png")
        Image.fromarray(pixels).save(path)
        items.append(Datum(path, i % 3, f"c{i % 3}"))
    return items


def test_test_loader(tmp_path):
    items = _noise_items(tmp_path, 5)
    tests = list(data.test_loader(items, 8, device="cpu"))
    assert len(tests) == 1 and tests[0][1].tolist() == [d.label for d in items]
    assert tests[0][0].shape == (5, 3, 8, 8) and tests[0][0].dtype == torch.float32
    loader = data.test_loader(items, 8, device="cpu")
    assert loader.batch_size == 100 and loader.num_workers == 0 and not loader.pin_memory
    assert data.default_workers("cpu") == 0
    assert data.default_workers("cuda") == min(8, data.usable_cpus()) >= 1
    with pytest.raises(ValueError, match="empty"):
        data.test_loader([], 8, device="cpu")


# ----------------------------------------------------------------------------- training images on the device


@pytest.mark.parametrize("height, width, scale", [(375, 500, (0.08, 1.0)), (32, 32, (0.5, 1.0)),
                                                  (8, 300, (0.08, 1.0)), (300, 9, (0.5, 1.0)), (1, 1, (0.08, 1.0))])
def test_crop_boxes_are_torchvisions(height, width, scale):
    """Same generator state, same box as torchvision's get_params (which draws from the global RNG), the
    ten-try loop and the central-crop fallback for extreme aspect ratios included."""
    for seed in range(300):
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), [3 / 4, 4 / 3])
        generator = torch.Generator().manual_seed(seed)
        assert data.crop_box(height, width, generator, scale) == expected, seed
        assert torch.equal(generator.get_state(), torch.get_rng_state())  # the same draws were consumed
        top, left, h, w = expected
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    # No try fits these two (every try is at least 12 pixels high, resp. 32 wide): the central crop of the
    # nearest allowed aspect ratio.
    fallback = {(8, 300): (0, 144, 8, 11), (300, 9): (144, 0, 12, 9)}.get((height, width))
    if fallback:
        assert data.crop_box(height, width, torch.Generator().manual_seed(0), scale) == fallback


def _image_files(tmp_path, shapes, modes=None) -> list[Datum]:
    """Smooth random pictures of the given (height, width), saved as PNG in the given PIL modes."""
    rng = np.random.default_rng(0)
    items = []
    for i, (h, w) in enumerate(shapes):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        img = coarse.resize((w, h), Image.BICUBIC)
        mode = (modes or ["RGB"] * len(shapes))[i]
        img = img.convert(mode) if mode != "P" else img.quantize(16)
        path = str(tmp_path / f"img{i}.png")
        img.save(path)
        items.append(Datum(path, i % 3, f"c{i % 3}"))
    return items


def test_train_images_batches(tmp_path):
    items = _image_files(tmp_path, [(10 + i, 14 + 2 * i) for i in range(5)], ["RGB", "L", "RGBA", "P", "RGB"])
    images = data.TrainImages(items, 8, 2, "cpu", seed=0)
    assert images.sizes == [(10 + i, 14 + 2 * i) for i in range(5)] and images.on_device
    for i, d in enumerate(items):  # decoded to RGB at full resolution, whatever the file's mode
        assert torch.equal(images.image(i), torch.from_numpy(np.array(data.load_image(d.impath))))
    batches = list(images)
    assert len(images) == len(batches) == 2  # 5 items, batch 2: the last incomplete batch is dropped
    x, y = batches[0]
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    lo = (0 - torch.tensor(data.CLIP_MEAN)) / torch.tensor(data.CLIP_STD)
    hi = (1 - torch.tensor(data.CLIP_MEAN)) / torch.tensor(data.CLIP_STD)
    assert ((x >= lo.view(3, 1, 1) - 1e-6) & (x <= hi.view(3, 1, 1) + 1e-6)).all()
    seen = torch.cat([y for _, y in batches]).tolist()
    assert len(seen) == 4 and set(seen) <= {0, 1, 2}  # 4 of the 5 images, each once
    small = list(data.TrainImages(items, 8, 16, "cpu", seed=0))  # fewer items than one batch: keep them all
    assert len(small) == 1 and small[0][0].shape[0] == 5 and sorted(small[0][1].tolist()) == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="empty"):
        data.TrainImages([], 8, 2, "cpu", seed=0)


def test_train_images_are_deterministic_per_seed(tmp_path):
    items = _image_files(tmp_path, [(20, 30)] * 6)

    def epochs(seed):
        images = data.TrainImages(items, 8, 2, "cpu", seed=seed)
        return [(x, y) for _ in range(2) for x, y in images]

    a, b, other = epochs(3), epochs(3), epochs(4)
    assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b)) and len(a) == 6
    assert not all(torch.equal(x, u) for (x, _), (u, _) in zip(a, other))
    assert not torch.equal(a[0][0], a[3][0])  # a fresh permutation and fresh crops every epoch
    # Independent of the global RNG: the methods' other random draws neither move nor are moved by it.
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert all(torch.equal(x, u) for (x, _), (u, _) in zip(epochs(3), a))
    assert torch.equal(torch.get_rng_state(), state)


def test_train_images_do_not_depend_on_the_thread_count(tmp_path):
    """On the CPU a batch's images are spread over torch's threads; the draws and the pixels stay the same."""
    items = _image_files(tmp_path, [(20 + i, 30 - i) for i in range(8)])
    saved = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            images = data.TrainImages(items, 8, 4, "cpu", seed=2)
            runs.append([(x, y) for _ in range(2) for x, y in images])
            assert images._pool is None if threads == 1 else images._pool[0] == threads
    finally:
        torch.set_num_threads(saved)
    for other in runs[1:]:
        assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(runs[0], other))


def test_augment_is_crop_resize_flip_normalise(tmp_path):
    """Each image gets crop_box's box, then RandomHorizontalFlip's draw, from the one generator; the result is
    the crop resized by `resize` (flipped when the draw says so), normalised with CLIP's mean and std."""
    items = _image_files(tmp_path, [(40, 60), (5, 7), (31, 30)])  # (5, 7): smaller than n_px, upsampled
    images = data.TrainImages(items, 16, 3, "cpu", seed=5)
    state = images.generator.get_state()
    out = images.augment([0, 1, 2, 0])
    replay = torch.Generator()
    replay.set_state(state)
    mean, std = torch.tensor(data.CLIP_MEAN).view(3, 1, 1), torch.tensor(data.CLIP_STD).view(3, 1, 1)
    flips = []
    for k, i in enumerate([0, 1, 2, 0]):
        top, left, h, w = data.crop_box(*images.sizes[i], replay, (0.08, 1.0))
        flips.append(torch.rand(1, generator=replay).item() < 0.5)
        crop = images.image(i)[top:top + h, left:left + w].permute(2, 0, 1)
        x = data.resize(crop, 16)
        x = x.flip(-1) if flips[-1] else x
        torch.testing.assert_close(out[k], (x / 255 - mean) / std, rtol=0, atol=1e-5)
    assert torch.equal(replay.get_state(), images.generator.get_state())
    # A flip flips: the same box with the opposite draw gives the mirror image.
    crop = images.image(0).permute(2, 0, 1)
    assert torch.equal(data.resize(crop.flip(-1), 16), data.resize(crop, 16).flip(-1))


def test_resize_matches_pil(tmp_path):
    """Both kernels of `resize` (torch's uint8 one, and the two float passes that run on CUDA) stay within a
    grey level of PIL's bicubic resize of the same crop, down- and upsampling."""
    from torchvision.transforms import functional as TF
    rng = np.random.default_rng(1)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    img = coarse.resize((120, 90), Image.BICUBIC)  # smooth, like a photo at this scale
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (3, 90, 120)
    for top, left, h, w, n_px in [(0, 0, 90, 120, 32), (10, 20, 50, 40, 24), (3, 5, 9, 12, 32)]:
        pil = TF.resized_crop(img, top, left, h, w, [n_px, n_px], T.InterpolationMode.BICUBIC)
        pil = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
        crop = pixels[:, top:top + h, left:left + w]
        for uint8_kernel in (True, False):
            x = data.resize(crop, n_px, uint8_kernel=uint8_kernel)
            assert x.shape == (3, n_px, n_px) and x.dtype == torch.float32
            assert torch.equal(x, x.round()) and x.min() >= 0 and x.max() <= 255
            assert (x - pil).abs().max() <= 1 and (x - pil).abs().mean() < 0.05, (top, uint8_kernel)


def test_train_images_on_the_demo_datasets(tmp_path):
    import demo
    root = demo.write_datasets(tmp_path)
    for key in data.DEMO_DATASETS:
        base, _ = data.base_to_novel(key, root, 4, 1, cache_dir=tmp_path / "cache")
        images = data.TrainImages(base.train, demo.RES, 8, "cpu", seed=1, min_crop=base.min_crop)
        x, y = next(iter(images))
        assert x.shape == (8, 3, demo.RES, demo.RES) and torch.isfinite(x).all() and y.max() < len(base.classnames)


def test_feature_views(tmp_path):
    items = _image_files(tmp_path, [(20, 30)] * 5)
    images = data.TrainImages(items, 8, 2, "cpu", seed=0)
    views = data.FeatureViews(images, lambda x: x.mean(dim=(2, 3)), views=3, chunk=2)  # (B, 3) "features"
    assert views.features.shape == (3, 5, 3) and len(views) == 2
    assert not torch.equal(views.features[0], views.features[1])  # the views are different crops
    batches = list(views)
    assert len(batches) == 2 and batches[0][0].shape == (2, 3)
    for x, y in batches:  # each row is one of its image's K views
        for row, label in zip(x, y):
            assert any(torch.equal(row, views.features[k, i]) for k in range(3) for i in range(5)
                       if views.labels[i] == label)
