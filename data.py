"""Datasets, few-shot splits, templates, transforms and loaders shared by every method.

Everything that must be identical across methods for a fair comparison lives here
(CoOp's few-shot base-to-novel protocol, Zhou et al., IJCV 2022 and CVPR 2022):

* Readers for the 11 base-to-novel datasets, the 4 ImageNet variants and 3 tiny demo datasets, in
  CoOp's on-disk layout under one data root. Labels and class names come from the split files (or
  folders); class names keep their raw spelling (underscores included) and are cleaned only when a
  prompt is built (`clean_classname`).
* `few_shot`: CoOp's draw. Per label, in order of first appearance, `random.sample(items, shots)` (all
  items when fewer, which consumes no randomness), then the val draw with min(shots, 4) shots continuing
  the same stream. It uses a private `random.Random(seed)`, whose stream is exactly that of
  `random.seed(seed)` followed by module-level `random.sample`, so the draw does not disturb (or depend
  on) the caller's global RNG. It is drawn afresh every run and recorded as JSON (`few_shot_cached`).
* `subsample_classes` / `base_to_novel`: sorted train labels, base = first ceil(n/2), relabelled 0..k-1.
* Per-dataset templates (three columns, one per method paper that fixed them: CoOp, KgCoOp, ProGrad) and the
  80 CLIP ImageNet templates; docs/protocol.md tabulates them and says which method uses which column.
* The transforms (CLIP's test-time preprocessing; CoOp's RandomResizedCrop and flip for training), the
  evaluation DataLoader, and `TrainImages`: the few-shot training images decoded once and augmented per batch
  on the training device.

Decisions where the protocol leaves room:
* ImageNet-A/-R: the 200 wnid folders are relabelled 0..199 in sorted-wnid order (as CoOp does) and
  named from ImageNet's `classnames.txt`, which must be present in the variant's folder. Evaluation
  builds prompts from the variant's own 200 names, so logits are 200-way.
* ImageNet-V2: folder i is ImageNet label i, named by the i-th wnid of `classnames.txt` in sorted order
  (the same order that gives ImageNet's labels).
* Folder-based readers sort image file names. CoOp used unsorted `os.listdir` for ImageNet, so its
  ImageNet draws depend on the filesystem; sorting makes ours identical on every machine. Hidden files
  are skipped and, at the class-folder level, plain files such as ImageNet-A's README.txt are ignored.
* ImageNet has no val split: val = test, so its few-shot val draw (what temperature scaling is fitted on)
  samples from the test list (docs/protocol.md, "The validation split and temperature scaling").
* Every real dataset must have its published number of classes; a different count means an incomplete
  download or a wrong split file and is an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import random
import tempfile
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm import tqdm

from clip.clip import MEAN as CLIP_MEAN, STD as CLIP_STD  # CLIP's image normalisation

HINT = "see docs/datasets.md"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "calibrated-prompts", "splits")
COLUMNS = ("coop", "kgcoop", "prograd")


class UserError(Exception):
    """A problem with what the user gave (an option, a file, a folder, the machine), as opposed to a bug.

    Every script runs its main() inside `eval.user_errors()`, which prints the message as one line
    `error: <what>, <where>, <what to do>` on stderr and exits with `status`, without a traceback; library
    callers can catch it like any exception. The message is written without the "error: " prefix.
    """

    status = 1


class DatasetError(UserError):
    """A dataset folder, split file or image is missing or inconsistent."""


@functools.cache
def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, payload: bytes) -> None:
    """Write `payload` to `path` through a temporary file in the same folder (fsync, then rename), so no
    reader ever sees half a file, with the permissions a plain open() would give (0666 minus the umask).

    The folder is created when missing. A failed write removes its temporary file and raises a UserError that
    names the file and says when the disk is full."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if not isinstance(e, OSError):
            raise
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise UserError(f"cannot write {path}: {why}; free space or fix the folder's permissions (or write "
                        f"elsewhere), then rerun") from None


@dataclass(frozen=True)
class Datum:
    impath: str  # absolute
    label: int
    classname: str


@dataclass
class DatasetSplits:
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    classnames: list[str]  # classnames[label]
    min_crop: float = 0.08  # the dataset's smallest training crop (DatasetInfo.min_crop)


@dataclass(frozen=True)
class DatasetInfo:
    key: str  # CLI name
    name: str  # CoOp's name; split-file datasets read split_zhou_<name>.json
    folder: str  # under the data root
    images: str  # image folder inside `folder` ("" = the folder itself)
    layout: str  # reader: split | aircraft | imagenet | wnid | numbered
    n_classes: int | None = None  # published class count (None: whatever the split file says)
    templates: tuple[str, str, str] = ("a photo of a {}.",) * 3  # columns CoOp, KgCoOp, ProGrad
    # Smallest area fraction of the training RandomResizedCrop: CoOp's 0.08 for photos; the demo's 32-pixel
    # pictures keep 0.5, since an 8% crop (9 x 9 pixels) cuts their object away.
    min_crop: float = 0.08

    @property
    def split_file(self) -> str:
        return f"split_zhou_{self.name}.json"


def _same(t: str) -> tuple[str, str, str]:
    return (t, t, t)


_INFOS = [
    DatasetInfo("imagenet", "ImageNet", "imagenet", "images", "imagenet", 1000),
    DatasetInfo("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", "split", 100),
    DatasetInfo("oxford_pets", "OxfordPets", "oxford_pets", "images", "split", 37,
                ("a photo of a {}, a type of pet.",) * 2 + ("a type of pet, a photo of a {}.",)),
    DatasetInfo("stanford_cars", "StanfordCars", "stanford_cars", "", "split", 196),
    DatasetInfo("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", "split", 102,
                ("a photo of a {}, a type of flower.",) * 2 + ("a type of flower, a photo of a {}.",)),
    DatasetInfo("food101", "Food101", "food-101", "images", "split", 101,
                ("a photo of {}, a type of food.",) * 2 + ("a type of food, a photo of {}.",)),
    DatasetInfo("fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "images", "aircraft", 100,
                ("a photo of a {}, a type of aircraft.",) * 2 + ("a type of aircraft, a photo of a {}.",)),
    DatasetInfo("sun397", "SUN397", "sun397", "SUN397", "split", 397),
    DatasetInfo("dtd", "DescribableTextures", "dtd", "images", "split", 47,
                ("{} texture.", "a photo of a {}, a type of texture.", "a texture of {}.")),
    DatasetInfo("eurosat", "EuroSAT", "eurosat", "2750", "split", 10,
                _same("a centered satellite photo of {}.")),
    DatasetInfo("ucf101", "UCF101", "ucf101", "UCF-101-midframes", "split", 101,
                _same("a photo of a person doing {}.")),
    DatasetInfo("imagenetv2", "ImageNetV2", "imagenetv2",
                "imagenetv2-matched-frequency-format-val", "numbered", 1000),
    DatasetInfo("imagenet_sketch", "ImageNetSketch", "imagenet-sketch", "images", "wnid", 1000),
    DatasetInfo("imagenet_a", "ImageNetA", "imagenet-adversarial", "imagenet-a", "wnid", 200),
    DatasetInfo("imagenet_r", "ImageNetR", "imagenet-rendition", "imagenet-r", "wnid", 200),
    DatasetInfo("demo_shapes", "DemoShapes", "demo_shapes", "images", "split", min_crop=0.5),
    DatasetInfo("demo_colours", "DemoColours", "demo_colours", "images", "split", min_crop=0.5),
    DatasetInfo("demo_patterns", "DemoPatterns", "demo_patterns", "images", "split", min_crop=0.5),
]
DATASETS: dict[str, DatasetInfo] = {info.key: info for info in _INFOS}
BASE_TO_NOVEL = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                 "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
XD_TARGETS = BASE_TO_NOVEL[1:]
DG_TARGETS = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
DEMO_DATASETS = ["demo_shapes", "demo_colours", "demo_patterns"]

# The 80 prompt templates of the CLIP paper's ImageNet ensemble (PromptSRC's w_ens, DAC's copy).
IMAGENET_TEMPLATES: list[str] = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.",
    "art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.",
    "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.",
    "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
]

# The original PromptSRC's text ensemble (Khattak et al., ICCV 2023): the first 60 of the 80 templates above, in
# their order except that "a photo of a {}." leads, as listed in the official trainer.
PROMPTSRC_TEMPLATES: list[str] = ["a photo of a {}."] + [t for t in IMAGENET_TEMPLATES[:60] if t != "a photo of a {}."]


def dataset_info(key: str) -> DatasetInfo:
    if key not in DATASETS:
        raise UserError(f"unknown dataset {key!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[key]


# ----------------------------------------------------------------------------- readers


def _require(path: str, kind: str, what: str) -> str:
    ok = os.path.isdir(path) if kind == "dir" else os.path.isfile(path)
    if not ok:
        raise DatasetError(f"{what} not found: expected {'folder' if kind == 'dir' else 'file'} "
                           f"{path}; {HINT}")
    return path


def _visible(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def _class_dirs(path: str) -> list[str]:
    with os.scandir(path) as it:
        return _visible(e.name for e in it if e.is_dir())


def _folder_items(image_dir: str, folders: Sequence[str], classnames: Sequence[str]) -> list[Datum]:
    """Label i = every visible file of folders[i], in sorted name order."""
    items = []
    for label, folder in enumerate(folders):
        path = os.path.join(image_dir, folder)
        names = _visible(os.listdir(path))
        if not names:
            raise DatasetError(f"class folder {path} has no images; {HINT}")
        items += [Datum(os.path.join(path, n), label, classnames[label]) for n in names]
    return items


def _check_images_exist(items: Iterable[Datum], source: str) -> None:
    """One listdir per folder instead of one stat per image (fast on network filesystems)."""
    by_dir: dict[str, list[str]] = defaultdict(list)
    for d in items:
        by_dir[os.path.dirname(d.impath)].append(d.impath)
    missing = []
    for folder, paths in by_dir.items():
        try:
            present = set(os.listdir(folder))
        except OSError:
            present = set()
        missing += [p for p in paths if os.path.basename(p) not in present]
    if missing:
        raise DatasetError(f"{len(missing)} image(s) listed in {source} are missing, e.g. expected "
                           f"{missing[0]}" + (f" and {missing[1]}" if len(missing) > 1 else "")
                           + f"; {HINT}")


def _class_table(items: Iterable[Datum], source: str) -> list[str]:
    """classnames[label], rejecting a label with two names, a name with two labels, and labels
    outside 0..n-1 (n = number of distinct labels, so a gap is also caught)."""
    names: dict[int, str] = {}
    labels_of: dict[str, int] = {}
    for d in items:
        if names.setdefault(d.label, d.classname) != d.classname:
            raise DatasetError(f"{source}: label {d.label} has two class names, "
                               f"{names[d.label]!r} and {d.classname!r}")
        if labels_of.setdefault(d.classname, d.label) != d.label:
            raise DatasetError(f"{source}: class {d.classname!r} has two labels, "
                               f"{labels_of[d.classname]} and {d.label}")
    n = len(names)
    bad = sorted(label for label in names if not 0 <= label < n)
    if bad:
        raise DatasetError(f"{source}: labels {bad[:5]} out of range 0..{n - 1} "
                           f"({n} classes; labels must be 0..n-1 without gaps)")
    return [names[i] for i in range(n)]


def _read_split(info: DatasetInfo, folder: str) -> DatasetSplits:
    """CoOp's split file: {"train"|"val"|"test": [[path relative to the image folder, label, name]]}."""
    path = _require(os.path.join(folder, info.split_file), "file", f"{info.name} split file")
    image_dir = _require(os.path.join(folder, info.images), "dir", f"{info.name} image folder")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read split file {path}: {e}; {HINT}") from e
    if not isinstance(raw, dict) or not all(isinstance(raw.get(s), list) for s in ("train", "val", "test")):
        raise DatasetError(f"split file {path} must be a JSON object with lists 'train', 'val', 'test'")
    splits = {}
    for split in ("train", "val", "test"):
        items = []
        for i, e in enumerate(raw[split]):
            if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and e[0]
                    and not os.path.isabs(e[0]) and type(e[1]) is int and isinstance(e[2], str)):
                raise DatasetError(f"split file {path}: {split}[{i}] = {e!r} is not "
                                   "[relative image path, integer label, class name]")
            items.append(Datum(os.path.join(image_dir, e[0]), e[1], e[2]))
        splits[split] = items
    everything = splits["train"] + splits["val"] + splits["test"]
    classnames = _class_table(everything, f"split file {path}")
    _check_images_exist(everything, f"split file {path}")
    return DatasetSplits(splits["train"], splits["val"], splits["test"], classnames)


def _read_aircraft(info: DatasetInfo, folder: str) -> DatasetSplits:
    """variants.txt (one class per line, label = line order) and images_variant_<split>.txt
    ("<image id> <variant name, may contain spaces>"), images at images/<id>.jpg."""
    variants_path = _require(os.path.join(folder, "variants.txt"), "file", "FGVCAircraft variants.txt")
    with open(variants_path, encoding="utf-8") as f:
        classnames = [line.strip() for line in f if line.strip()]
    label_of = {name: i for i, name in enumerate(classnames)}
    if len(label_of) != len(classnames):
        raise DatasetError(f"{variants_path} lists a variant twice")
    image_dir = _require(os.path.join(folder, info.images), "dir", "FGVCAircraft image folder")
    splits = {}
    for split in ("train", "val", "test"):
        path = _require(os.path.join(folder, f"images_variant_{split}.txt"), "file",
                        f"FGVCAircraft {split} list")
        items = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                image_id, _, name = line.strip().partition(" ")
                if not image_id:
                    continue  # blank line
                if name not in label_of:
                    raise DatasetError(f"{path} line {lineno}: variant {name!r} is not in {variants_path}")
                items.append(Datum(os.path.join(image_dir, image_id + ".jpg"), label_of[name], name))
        splits[split] = items
    _check_images_exist(splits["train"] + splits["val"] + splits["test"], f"{folder}/images_variant_*.txt")
    return DatasetSplits(splits["train"], splits["val"], splits["test"], classnames)


def _read_classnames_txt(folder: str) -> dict[str, str]:
    """classnames.txt: "<wnid> <class name>" per line -> {wnid: name} (file order)."""
    path = _require(os.path.join(folder, "classnames.txt"), "file", "ImageNet classnames.txt")
    names: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            wnid, _, name = line.strip().partition(" ")
            if not name.strip() or wnid in names:
                raise DatasetError(f"{path} line {lineno}: expected a new '<wnid> <class name>', "
                                   f"got {line.strip()!r}")
            names[wnid] = name.strip()
    return names


def _known_wnids(wnids: Sequence[str], names: dict[str, str], where: str, folder: str) -> None:
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise DatasetError(f"class folders {unknown[:3]} under {where} are not in "
                           f"{os.path.join(folder, 'classnames.txt')}")


def _read_imagenet(info: DatasetInfo, folder: str) -> DatasetSplits:
    names = _read_classnames_txt(folder)
    train_dir = _require(os.path.join(folder, info.images, "train"), "dir", "ImageNet train folder")
    val_dir = _require(os.path.join(folder, info.images, "val"), "dir", "ImageNet val folder")
    wnids = _class_dirs(train_dir)  # label = index in sorted folder order
    _known_wnids(wnids, names, train_dir, folder)
    if _class_dirs(val_dir) != wnids:
        raise DatasetError(f"the wnid folders of {val_dir} differ from those of {train_dir}; {HINT}")
    classnames = [names[w] for w in wnids]
    test = _folder_items(val_dir, wnids, classnames)
    return DatasetSplits(_folder_items(train_dir, wnids, classnames), list(test), test, classnames)


def _read_wnid_folders(info: DatasetInfo, folder: str) -> DatasetSplits:
    """ImageNet-Sketch/-A/-R: test only; label = index of the wnid folder in sorted order."""
    names = _read_classnames_txt(folder)
    image_dir = _require(os.path.join(folder, info.images), "dir", f"{info.name} image folder")
    wnids = _class_dirs(image_dir)
    _known_wnids(wnids, names, image_dir, folder)
    classnames = [names[w] for w in wnids]
    return DatasetSplits([], [], _folder_items(image_dir, wnids, classnames), classnames)


def _read_numbered(info: DatasetInfo, folder: str) -> DatasetSplits:
    """ImageNet-V2: folder "i" holds ImageNet label i (sorted-wnid order of classnames.txt)."""
    names = _read_classnames_txt(folder)
    classnames = [names[w] for w in sorted(names)]
    image_dir = _require(os.path.join(folder, info.images), "dir", f"{info.name} image folder")
    expected = [str(i) for i in range(len(classnames))]
    found = set(_class_dirs(image_dir))
    if found != set(expected):
        missing, extra = sorted(set(expected) - found, key=int), sorted(found - set(expected))
        raise DatasetError(f"{image_dir} must hold folders 0..{len(expected) - 1}; missing "
                           f"{missing[:3]}, unexpected {extra[:3]}; {HINT}")
    return DatasetSplits([], [], _folder_items(image_dir, expected, classnames), classnames)


_READERS: dict[str, Callable[[DatasetInfo, str], DatasetSplits]] = {
    "split": _read_split, "aircraft": _read_aircraft, "imagenet": _read_imagenet,
    "wnid": _read_wnid_folders, "numbered": _read_numbered,
}


def load_dataset(key: str, root: str | os.PathLike) -> DatasetSplits:
    """Full train/val/test splits of dataset `key` under data root `root`, original labels."""
    info = dataset_info(key)
    folder = os.path.join(os.path.abspath(os.path.expanduser(root)), info.folder)
    _require(folder, "dir", f"{info.name} dataset folder")
    splits = dataclasses.replace(_READERS[info.layout](info, folder), min_crop=info.min_crop)
    if info.n_classes is not None and len(splits.classnames) != info.n_classes:
        raise DatasetError(f"{info.name} under {folder} has {len(splits.classnames)} classes, expected "
                           f"{info.n_classes} (incomplete download or wrong split file?); {HINT}")
    return splits


# ----------------------------------------------------------------------------- few-shot protocol


def _draw(rng: random.Random, items: Sequence[Datum], shots: int) -> list[Datum]:
    groups: dict[int, list[Datum]] = {}  # insertion order = order of first appearance
    for d in items:
        groups.setdefault(d.label, []).append(d)
    out: list[Datum] = []
    for group in groups.values():
        # fewer items than shots: keep them all and, as in the public recipe, draw nothing
        out += rng.sample(group, shots) if len(group) >= shots else group
    return out


DRAW_RULE = "coop-1"  # recorded with every draw; a new name whenever `few_shot` would draw differently


def few_shot(train: Sequence[Datum], val: Sequence[Datum], shots: int,
             seed: int) -> tuple[list[Datum], list[Datum]]:
    """CoOp's draw: `shots` per train label, then min(shots, 4) per val label, one stream."""
    if shots < 1:
        raise UserError(f"--shots must be at least 1, got {shots}")
    rng = random.Random(seed)  # same stream as random.seed(seed) + random.sample
    return _draw(rng, train, shots), _draw(rng, val, min(shots, 4))


def _cache_file(key: str, shots: int, seed: int, cache_dir: str | os.PathLike | None) -> str:
    base = cache_dir or os.environ.get("CP_CACHE") or DEFAULT_CACHE_DIR
    return os.path.join(os.path.expanduser(base), key, f"shot_{shots}-seed_{seed}.json")


def _rows(items: Iterable[Datum]) -> list[list]:
    return [[d.impath, d.label, d.classname] for d in items]


def _fingerprint(train: Sequence[Datum], val: Sequence[Datum]) -> str:
    """Hash of the lists drawn from, so a record made from a different split file or root is told apart."""
    h = hashlib.sha256()
    for split in (train, val):
        h.update(json.dumps(_rows(split)).encode())
    return h.hexdigest()


def few_shot_cached(key: str, train: Sequence[Datum], val: Sequence[Datum], shots: int, seed: int,
                    cache_dir: str | os.PathLike | None = None) -> tuple[list[Datum], list[Datum]]:
    """`few_shot`, drawn afresh every time (it takes microseconds) and recorded as JSON in
    <cache_dir>/<key>/shot_<shots>-seed_<seed>.json, so the images a run trained on can be looked up.

    cache_dir: argument, else $CP_CACHE, else ~/.cache/calibrated-prompts/splits (never the dataset folder,
    which may be read-only). The record is never read back as the draw: one that differs from the draw (an
    edited or corrupt file, another split file, an older draw rule) is reported and replaced, and a record
    that cannot be written costs only the record.
    """
    path = _cache_file(key, shots, seed, cache_dir)
    train_fs, val_fs = few_shot(train, val, shots, seed)
    record = {"dataset": key, "shots": shots, "seed": seed, "rule": DRAW_RULE, "source": _fingerprint(train, val),
              "train": _rows(train_fs), "val": _rows(val_fs)}
    try:
        with open(path, encoding="utf-8") as f:
            if json.load(f) == record:
                return train_fs, val_fs
        warnings.warn(f"few-shot record {path} differs from the draw of seed {seed}; replacing it", RuntimeWarning)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        warnings.warn(f"few-shot record {path} is unreadable ({e}); replacing it", RuntimeWarning)
    try:
        write_atomic(path, json.dumps(record).encode())
    except UserError as e:  # the draw is deterministic; losing the record is not fatal
        warnings.warn(f"could not write the few-shot record: {e}", RuntimeWarning)
    return train_fs, val_fs


def subsample_classes(splits: DatasetSplits, which: str) -> DatasetSplits:
    """Base = first ceil(n/2) of the sorted train labels, new = the rest, relabelled 0..k-1."""
    if which not in ("base", "new", "all"):
        raise ValueError(f"which must be 'base', 'new' or 'all', got {which!r}")
    if which == "all":
        return dataclasses.replace(splits, train=list(splits.train), val=list(splits.val), test=list(splits.test),
                                   classnames=list(splits.classnames))
    labels = sorted({d.label for d in splits.train})
    if not labels:
        raise DatasetError("a base/novel split needs a non-empty train split")
    m = math.ceil(len(labels) / 2)
    chosen = labels[:m] if which == "base" else labels[m:]
    new_label = {old: new for new, old in enumerate(chosen)}

    def keep(items: list[Datum]) -> list[Datum]:
        return [Datum(d.impath, new_label[d.label], d.classname) for d in items if d.label in new_label]

    return dataclasses.replace(splits, train=keep(splits.train), val=keep(splits.val), test=keep(splits.test),
                               classnames=[splits.classnames[old] for old in chosen])


def load_few_shot(key: str, root: str | os.PathLike, shots: int, seed: int,
                  cache_dir: str | os.PathLike | None = None) -> DatasetSplits:
    """All classes: few-shot train/val, full test (e.g. ImageNet for the cross-dataset protocol)."""
    full = load_dataset(key, root)
    if not full.train:
        raise DatasetError(f"{key} has no train split (evaluation-only dataset)")
    train, val = few_shot_cached(key, full.train, full.val, shots, seed, cache_dir)
    return dataclasses.replace(full, train=train, val=val)


def base_to_novel(key: str, root: str | os.PathLike, shots: int, seed: int,
                  cache_dir: str | os.PathLike | None = None) -> tuple[DatasetSplits, DatasetSplits]:
    """(base, novel): few-shot drawn over all classes first, then split (CoCoOp's base-to-novel protocol)."""
    splits = load_few_shot(key, root, shots, seed, cache_dir)
    return subsample_classes(splits, "base"), subsample_classes(splits, "new")


PROTOCOLS = ("base2new", "xd")


def protocol_splits(protocol: str, key: str, root: str | os.PathLike, shots: int, seed: int,
                    cache_dir: str | os.PathLike | None = None) -> tuple[DatasetSplits, dict[str, DatasetSplits]]:
    """(training splits, {target name: splits to evaluate}), every dataset loaded and checked up front.

    base2new: (base, {"base": base, "novel": novel}).
    xd: (few-shot `key` over all classes, {key: the same, target: full splits}); targets are the other
    10 datasets and the 4 ImageNet variants, or the other demo datasets when `key` is a demo dataset.
    """
    if protocol == "base2new":
        base, new = base_to_novel(key, root, shots, seed, cache_dir)
        train, targets = base, {"base": base, "novel": new}
    elif protocol == "xd":
        source = load_few_shot(key, root, shots, seed, cache_dir)
        pool = DEMO_DATASETS if key in DEMO_DATASETS else XD_TARGETS + DG_TARGETS
        train, targets = source, {key: source, **{t: load_dataset(t, root) for t in pool if t != key}}
    else:
        raise UserError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    check_images([*train.train, *train.val, *(d for split in targets.values() for d in split.test)])
    return train, targets


def _decode_problem(path: str) -> str | None:
    """Why the image at `path` cannot be decoded, or None. A JPEG is decoded at 1/8 scale (PIL's draft): its
    compressed data is still read to the end, so truncated or corrupt files fail as they would in full."""
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__
    return None


def check_images(items: Iterable[Datum], threads: int | None = None) -> None:
    """Decode every image a run will read, once, before any training: a DatasetError lists the bad files
    (instead of a crash in the evaluation after hours of training). Threads: min(8, usable CPUs) by default."""
    paths = sorted({d.impath for d in items})
    with ThreadPoolExecutor(threads or min(8, usable_cpus())) as pool:  # PIL releases the GIL while decoding
        problems = [(p, why) for p, why in zip(paths, pool.map(_decode_problem, paths)) if why]
    if problems:
        shown = ", ".join(f"{p} ({why})" for p, why in problems[:3])
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise DatasetError(f"{len(problems)} of the {len(paths)} images this run reads cannot be decoded: {shown}"
                           f"{more}; replace or re-download them ({HINT})")


# ----------------------------------------------------------------------------- templates


def clean_classname(name: str) -> str:
    return name.replace("_", " ")


def template(key: str, column: str = "coop") -> str:
    """Hand-written template of the method papers: column coop | kgcoop | prograd."""
    if column not in COLUMNS:
        raise ValueError(f"template column must be one of {COLUMNS}, got {column!r}")
    return dataset_info(key).templates[COLUMNS.index(column)]


def prompts(key: str, classnames: Sequence[str], column: str = "coop") -> list[str]:
    t = template(key, column)
    return [t.format(clean_classname(c)) for c in classnames]


# ----------------------------------------------------------------------------- transforms, loaders


def train_transform(n_px: int, min_crop: float = 0.08) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(n_px, scale=(min_crop, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def test_transform(n_px: int) -> T.Compose:
    return T.Compose([
        T.Resize(n_px, interpolation=T.InterpolationMode.BICUBIC),  # shorter side -> n_px
        T.CenterCrop(n_px), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


@contextlib.contextmanager
def _open_image(path: str) -> Iterator[Image.Image]:
    """Image.open, turning a missing or unreadable file into a DatasetError that names it."""
    try:
        with Image.open(path) as im:
            yield im
    except FileNotFoundError as e:
        raise DatasetError(f"image not found: {path}; {HINT}") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


def load_image(path: str) -> Image.Image:
    """Decode to RGB, naming the file on failure."""
    with _open_image(path) as im:
        return im.convert("RGB")


class ImageList(Dataset):
    """(transform(image), label) for a list of Datum: the evaluation images, decoded in loader workers."""

    def __init__(self, items: Sequence[Datum], transform: Callable):
        self.items, self.transform = list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        d = self.items[i]
        return self.transform(load_image(d.impath)), d.label


def _is_cuda(device: str | torch.device | None) -> bool:
    return torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()


def usable_cpus() -> int:
    """CPUs this process may run on (a SLURM or taskset allocation, not the whole machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(device: str | torch.device | None) -> int:
    """Decoding processes (evaluation) and threads (training images): min(8, usable CPUs) on CUDA, where PIL
    decoding and resizing are what the GPU waits for; 0 on CPU, where they would compete with the model."""
    return min(8, usable_cpus()) if _is_cuda(device) else 0


def test_loader(items: Sequence[Datum], n_px: int, batch_size: int = 100,
                device: str | torch.device | None = None, num_workers: int | None = None) -> DataLoader:
    """Fixed order, no augmentation, every item (device None = CUDA if available)."""
    if len(items) == 0:
        raise ValueError("cannot build a DataLoader over an empty item list")
    workers = default_workers(device) if num_workers is None else num_workers
    return DataLoader(ImageList(items, test_transform(n_px)), batch_size=batch_size, shuffle=False,
                      num_workers=workers, pin_memory=_is_cuda(device), persistent_workers=False)


# ----------------------------------------------------------------------------- training images on the device


def crop_box(height: int, width: int, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop: torchvision's RandomResizedCrop.get_params, step for step (ten tries
    at an area fraction in `scale` and a log-uniform aspect ratio in `ratio`, then the central-crop fallback),
    drawing from `generator` instead of the global RNG, so the same generator state gives the same box."""
    area = height * width
    log_lo, log_hi = torch.log(torch.tensor(ratio)).tolist()
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize(crop: torch.Tensor, n_px: int, uint8_kernel: bool | None = None) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, n_px, n_px) float32 holding whole grey levels 0..255: bicubic with antialiasing,
    as PIL resizes a uint8 image.

    uint8_kernel (default: on the CPU) uses torch's uint8 kernel, a port of PIL's fixed-point resampling.
    Otherwise (CUDA has no uint8 bicubic kernel) it runs in float32 as PIL does, horizontal pass first, each
    pass rounded and clamped to 0..255 as PIL stores it; a single 2-D float pass would differ from PIL several
    times more (BENCHMARKS.md, "Training images on the device").
    """
    if crop.device.type == "cpu" if uint8_kernel is None else uint8_kernel:
        return F.interpolate(crop[None], size=(n_px, n_px), mode="bicubic", antialias=True)[0].float()
    x = crop[None].float()  # (1, 3, h, w)
    x = F.interpolate(x, size=(x.shape[2], n_px), mode="bicubic", antialias=True).clamp_(0, 255).round_()
    x = F.interpolate(x, size=(n_px, n_px), mode="bicubic", antialias=True).clamp_(0, 255).round_()
    return x[0]


class TrainImages:
    """The few-shot training set, decoded once and augmented per batch on the training device.

    Every image is decoded to RGB uint8 at its full resolution (a pre-shrunk image would change what a small
    crop sees) into one flat buffer: on the training device when all of them fit `budget_bytes`, otherwise in
    host memory (pinned on CUDA, so each crop's rows are copied asynchronously). Each batch then takes, per
    image, a RandomResizedCrop box (`crop_box`, scale (min_crop, 1)) and a horizontal flip with p 0.5 from a
    torch.Generator seeded with `seed`, resizes the crop to n_px (`resize`) and applies CLIP's normalisation:
    (B, 3, n_px, n_px) float32 on the device, with no loader workers. Iterating gives one epoch: a fresh
    permutation, batches of `batch_size`, the last incomplete batch dropped when there is at least one full
    batch (as the DataLoader it replaces did). `data.train_transform` is the PIL version of the same
    augmentation; BENCHMARKS.md ("Training images on the device") measures how far the pixels differ.
    """

    def __init__(self, items: Sequence[Datum], n_px: int, batch_size: int, device: str | torch.device,
                 seed: int, min_crop: float = 0.08, budget_bytes: int = 2 * 1024**3,
                 num_workers: int | None = None):
        if len(items) == 0:
            raise ValueError("cannot train on an empty item list")
        self.items, self.n_px, self.batch_size, self.device = list(items), n_px, batch_size, torch.device(device)
        self.scale, self._pool = (min_crop, 1.0), None
        self.generator = torch.Generator().manual_seed(seed)
        self.labels = torch.tensor([d.label for d in self.items], device=self.device)  # (N,)
        mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        self.mean, self.std = (255 * mean).view(3, 1, 1).to(self.device), (255 * std).view(3, 1, 1).to(self.device)
        # Sizes from the headers first, so the buffer is allocated once and filled in place.
        self.sizes = [_image_size(d.impath) for d in self.items]  # (h, w) per image
        self.offsets = [0]
        for h, w in self.sizes:
            self.offsets.append(self.offsets[-1] + h * w * 3)
        self.nbytes = self.offsets[-1]
        cuda = self.device.type == "cuda"
        self.on_device = self.device.type == "cpu" or self.nbytes <= budget_bytes
        where = self.device if self.on_device else "cpu"
        self.pixels = torch.empty(self.nbytes, dtype=torch.uint8, device=where, pin_memory=cuda and not self.on_device)
        workers = default_workers(device) if num_workers is None else num_workers
        with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL releases the GIL while it decodes
            decoded = pool.map(lambda d: np.array(load_image(d.impath)), self.items)  # (h, w, 3)
            for i, hwc in enumerate(tqdm(decoded, total=len(self.items), desc="decoding training images")):
                if hwc.shape[:2] != self.sizes[i]:
                    raise DatasetError(f"image {self.items[i].impath} decoded to {hwc.shape[:2]}, its header says "
                                       f"{self.sizes[i]}")
                self.pixels[self.offsets[i]:self.offsets[i + 1]].copy_(torch.from_numpy(hwc).view(-1))

    def __len__(self) -> int:
        n = len(self.items)
        return n // self.batch_size if n >= self.batch_size else 1

    def image(self, i: int) -> torch.Tensor:
        """Image i as a (h, w, 3) uint8 view of the buffer."""
        h, w = self.sizes[i]
        return self.pixels[self.offsets[i]:self.offsets[i + 1]].view(h, w, 3)

    def augment(self, indices: Sequence[int]) -> torch.Tensor:
        """A random crop of each image, resized to n_px, flipped with p 0.5, normalised: (B, 3, n_px, n_px)."""
        draws = []  # drawn first, in image order, so the generator's stream does not depend on the threads
        for i in indices:
            box = crop_box(*self.sizes[i], self.generator, self.scale)
            draws.append((i, box, torch.rand(1, generator=self.generator).item() < 0.5))  # RandomHorizontalFlip's draw
        out = torch.empty(len(draws), 3, self.n_px, self.n_px, device=self.device)  # (B, 3, n_px, n_px)

        def fill(k: int) -> None:
            i, (top, left, h, w), flip = draws[k]
            rows = self.image(i)[top:top + h]  # (h, W, 3): contiguous, so a pinned one is copied asynchronously
            crop = rows.to(self.device, non_blocking=True)[:, left:left + w].permute(2, 0, 1)  # (3, h, w)
            x = resize(crop, self.n_px)  # (3, n_px, n_px), values 0..255
            out[k] = x.flip(-1) if flip else x
            out[k].sub_(self.mean).div_(self.std)  # = (x / 255 - mean) / std, CLIP's normalisation

        # On the CPU one image's kernels are too small to use torch's threads, so the images of a batch are
        # spread over them instead (torch releases the GIL); each image's pixels are the same either way.
        threads = torch.get_num_threads() if self.device.type == "cpu" else 1
        if threads > 1 and len(draws) > 1:
            if self._pool is None or self._pool[0] != threads:
                if self._pool is not None:
                    self._pool[1].shutdown()
                self._pool = (threads, ThreadPoolExecutor(threads))
            list(self._pool[1].map(fill, range(len(draws))))
        else:
            for k in range(len(draws)):
                fill(k)
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.items), generator=self.generator)  # (N,)
        on_device = order.to(self.device)  # labels are gathered on the device: no copy, no sync per batch
        order = order.tolist()  # the crops are drawn per image, on the host
        size = min(self.batch_size, len(self.items))
        for start in range(0, len(self) * size, size):
            images, labels = self.augment(order[start:start + size]), self.labels[on_device[start:start + size]]
            yield images, labels  # (B, 3, n_px, n_px), (B,)


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding it."""
    with _open_image(path) as im:
        return im.height, im.width


class FeatureViews:
    """`--feature-cache K`: K augmented views of every training image, encoded once by a frozen image encoder.

    The views come from `images.augment` in file order; each epoch draws one of the K views per image and
    yields shuffled (features, labels) batches with the same drop_last rule as `TrainImages`, so training runs
    only the text side. A deviation from the protocol (augmentation is limited to K fixed views per image),
    opt-in for methods whose image encoder is frozen; BENCHMARKS.md ("The --feature-cache study") measures its
    speed-up and how far the metrics move.
    """

    def __init__(self, images: TrainImages, encode_fn: Callable, views: int, chunk: int = 100):
        n = len(images.items)
        feats = []
        with torch.no_grad():
            for _ in tqdm(range(views), desc=f"encoding {views} views", leave=False):
                feats.append(torch.cat([encode_fn(images.augment(range(s, min(s + chunk, n))))
                                        for s in range(0, n, chunk)]))  # (N, E)
        self.features = torch.stack(feats)  # (K, N, E)
        self.labels, self.batch_size, self.generator = images.labels, images.batch_size, images.generator

    def __len__(self) -> int:
        n = self.labels.numel()
        return n // self.batch_size if n >= self.batch_size else 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        k, n, _ = self.features.shape
        view = torch.randint(k, (n,), generator=self.generator).to(self.features.device)  # one view per image
        order = torch.randperm(n, generator=self.generator).to(self.features.device)
        size = min(self.batch_size, n)
        for start in range(0, len(self) * size, size):
            idx = order[start:start + size]
            yield self.features[view[idx], idx], self.labels[idx]  # (B, E), (B,)
