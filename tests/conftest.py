"""Shared test fixtures: a tiny random CLIP checkpoint and a tiny dataset in a real dataset's layout."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# EuroSAT's real class names and layout (eurosat/2750/<class>/<image>, split_zhou_EuroSAT.json): 10 classes,
# so the base/novel split is 5/5 as in the benchmark.
EUROSAT_CLASSES = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
                   "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake"]
COLOURS = [(220, 40, 40), (40, 160, 40), (40, 40, 220), (220, 220, 40), (220, 40, 220),
           (40, 220, 220), (120, 60, 20), (250, 150, 50), (128, 128, 128), (20, 20, 20)]


def make_eurosat(root: Path, per_class=(4, 2, 3), size: int = 40) -> Path:
    """Write eurosat/ with `per_class` (train, val, test) images per class: a coloured square on noise."""
    rng = np.random.default_rng(0)
    folder = root / "eurosat"
    split = {"train": [], "val": [], "test": []}
    for label, (name, colour) in enumerate(zip(EUROSAT_CLASSES, COLOURS)):
        cls_dir = folder / "2750" / name.replace(" ", "")
        cls_dir.mkdir(parents=True, exist_ok=True)
        for part, count in zip(("train", "val", "test"), per_class):
            for i in range(count):
                pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                x, y = rng.integers(0, size // 2, 2)
                pixels[y:y + size // 2, x:x + size // 2] = colour
                rel = f"{name.replace(' ', '')}/{part}_{i}.jpg"
                Image.fromarray(pixels).save(folder / "2750" / rel)
                split[part].append([rel, label, name])
    (folder / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    return root


def make_tiny_clip(path: Path, context_length: int = 32, seed: int = 0) -> Path:
    import clip
    torch.manual_seed(seed)
    model = clip.tiny_clip(context_length=context_length)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """(data root with eurosat/, tiny CLIP checkpoint path, split cache dir) shared by the method tests."""
    base = tmp_path_factory.mktemp("world")
    make_eurosat(base / "data")
    ckpt = make_tiny_clip(base / "tiny-clip.pt")
    return base / "data", ckpt, base / "cache"


def run_script(script: str, *args, cache=None, check=True, env_extra=None, timeout=600):
    """Run a method script as a user would, in a subprocess; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if cache is not None:
        env["CP_CACHE"] = str(cache)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
