"""A CPU demo world: procedural captioned pictures, a tiny CLIP pretrained on them, three small datasets.

The world (numpy + PIL only, deterministic per seed) draws 32 x 32 pictures of three kinds, with coverage
masks drawn 4x supersampled and box-filtered:

* objects: one of 12 shapes that stay distinct at 32 px (no pentagon/hexagon or crescent/semicircle
  look-alikes) in one of 11 colours (a fifth of them grey, so colour cannot stand in for shape), solid or
  filled with stripes, dots or checks, small to large, mostly centred, slightly rotated, on a dark, light,
  coloured or gradient background;
* patterns: one of 12 full-frame textures (striped, checkered, dotted, grid, wavy, ...) in two colours;
* glyphs: a digit 0-9 in some colour.

Each picture gets a caption from varied templates that always names its shape, texture or digit and names
its other attributes only sometimes ("a photo of a heart.", "a small grey star", "a red and blue zigzag
pattern", "the digit 7"), so shape-only captions are common and colour is not a shortcut. A caption's
claims decide which pictures it is true of; the contrastive loss counts every true caption in the batch
as a positive ("a circle" fits every circle), not only the one drawn with the picture.

The tiny CLIP (`clip.model.tiny_clip`: ViT image tower with 4-pixel patches, 3-layer text tower,
context 32, logit scale fixed at CLIP's 100) was pretrained on a stream of such batches by `python demo.py
pretrain` and ships with the repository (`SHIPPED`, fp16, 1.7 MB): pretraining is deterministic on one
machine, but other processors round differently and the differences grow over 1600 steps into different
models (zero-shot accuracy 4-7 points apart), so every machine starts from the shipped one instead. It is
unpacked into the cache as a plain state dict that `clip.load(path)` reads. The three demo datasets are drawn
from the same world under a distribution shift, so zero-shot transfer works but is imperfect and prompt
tuning has something to learn:

* demo_shapes: the 12 shapes in any colour on blotchy "cloudy" backgrounds never seen in pretraining;
* demo_colours: 5 colours x 4 shapes ("red circle", ...) under a randomly coloured light; base and novel
  classes are the two halves of a checkerboard over the colour-shape grid, so novel classes are unseen
  combinations of seen words;
* demo_patterns: the 12 textures at stretched scales and angles, with faded colours and more noise.

Look-alike pairs (circle/square, star/cross, striped/wavy, ...) are put in different halves of the
base-to-novel split. Their training crops keep at least half of the picture (data.DatasetInfo.min_crop).
Command line: `python demo.py {prepare,datasets,zeroshot,report,pretrain}`; the cache is
~/.cache/calibrated-prompts/demo, or $CP_DEMO_DIR.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import hashlib
import io
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import clip
import data
import eval as evaluation
from clip.model import tiny_clip

VERSION = 4  # part of every cache name: bump it when the world, the model or the recipe changes
# The tiny CLIP pretrained by `python demo.py pretrain` (`pack`ed: fp16, trained token rows only), shipped so
# that every machine starts from the same model; its sha256 is checked before use.
SHIPPED = Path(__file__).resolve().parent / "assets" / f"tiny_clip_v{VERSION}.pt"
SHIPPED_SHA256 = "62be74bfe9d7d9cc10115d527f151c2e5d00b362f9b8b2d2f2ff3973b8c4ac6e"
RES, SS = 32, 4  # image side (= the model's input resolution) and supersampling factor of the masks
N = RES * SS
MODEL_SIZES = dict(embed_dim=128, image_resolution=RES, vision_layers=4, vision_width=64, vision_patch_size=4,
                   context_length=32, transformer_width=128, transformer_layers=3)
STEPS, BATCH, LR, WARMUP = 1600, 64, 2e-3, 50
MEAN = np.array(clip.MEAN, np.float32)  # CLIP's image normalisation
STD = np.array(clip.STD, np.float32)

COLOURS = {"red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 215, 40), "green": (40, 165, 70),
           "blue": (40, 90, 225), "purple": (135, 60, 190), "pink": (245, 135, 195), "brown": (125, 80, 45),
           "white": (245, 245, 245), "black": (25, 25, 25), "grey": (128, 128, 128)}
FILLS = ["solid", "striped", "dotted", "checkered"]
TEXTURES = ["striped", "checkered", "dotted", "grid", "wavy", "zigzag",
            "bullseye", "brick", "speckled", "crosshatched", "spotted", "gradient"]
POSITIONS = {"centre": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}

# Drawing ranges per domain: "pretrain" is the world; the others are the datasets' shifted versions.
DOMAINS = {
    "pretrain": dict(backgrounds=["dark", "light", "coloured", "gradient"], noise=(0.0, 0.05), period=(4, 7),
                     angle=15, light=0.0, fade=1.0),
    "shapes": dict(backgrounds=["cloudy"], noise=(0.02, 0.06), period=(4, 7), angle=20, light=0.0, fade=1.0),
    "colours": dict(backgrounds=["dark", "light"], noise=(0.02, 0.05), period=(4, 7), angle=15, light=0.25, fade=1.0),
    "patterns": dict(backgrounds=["dark", "light"], noise=(0.02, 0.06), period=(3.5, 8.5), angle=20, light=0.0, fade=0.5),
}

# ----------------------------------------------------------------------------- drawing

_YY, _XX = ((np.mgrid[0:N, 0:N] + 0.5) / SS).astype(np.float32)  # supersampled pixel centres, in image pixels


def _box(a: np.ndarray) -> np.ndarray:
    """(N, N) coverage -> (RES, RES) block means: anti-aliased downsampling."""
    return a.reshape(RES, SS, RES, SS).mean(axis=(1, 3))


def _square(h: float) -> list[tuple[float, float]]:
    return [(-h, -h), (h, -h), (h, h), (-h, h)]


# Each shape: parts in a unit frame (y down), a polygon [(x, y), ...] or a disc (x, y, radius), drawn with
# ink 1 or cut out with ink 0.
SHAPE_PARTS = {
    "circle": [((0, 0, .9), 1)],
    "square": [(_square(.8), 1)],
    "triangle": [([(0, -1), (.95, .75), (-.95, .75)], 1)],
    "star": [([((1 if k % 2 else .42) * math.sin(k * math.pi / 5), -(1 if k % 2 else .42) * math.cos(k * math.pi / 5))
               for k in range(10)], 1)],
    "cross": [([(-.3, -.95), (.3, -.95), (.3, -.3), (.95, -.3), (.95, .3), (.3, .3),
                (.3, .95), (-.3, .95), (-.3, .3), (-.95, .3), (-.95, -.3), (-.3, -.3)], 1)],
    "ring": [((0, 0, 1), 1), ((0, 0, .55), 0)],
    "heart": [([(-.95, -.15), (.95, -.15), (0, .95)], 1), ((-.47, -.35, .5), 1), ((.47, -.35, .5), 1)],
    "diamond": [([(0, -1), (.6, 0), (0, 1), (-.6, 0)], 1)],
    "arrow": [([(-1, -.25), (.15, -.25), (.15, -.7), (1, 0), (.15, .7), (.15, .25), (-1, .25)], 1)],
    "moon": [((0, 0, 1), 1), ((.5, -.25, .8), 0)],
    "frame": [(_square(.85), 1), (_square(.5), 0)],
    "hourglass": [([(-.75, -.95), (.75, -.95), (0, 0)], 1), ([(-.75, .95), (.75, .95), (0, 0)], 1)],
}
SHAPES = list(SHAPE_PARTS)


def shape_mask(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """(N, N) coverage in [0, 1] of `shape` centred at (cx, cy) with radius r (image pixels), rotated."""
    c, s = math.cos(angle), math.sin(angle)
    at = lambda x, y: (SS * (cx + r * (x * c - y * s)), SS * (cy + r * (x * s + y * c)))  # noqa: E731
    im = Image.new("L", (N, N))
    draw = ImageDraw.Draw(im)
    for part, ink in SHAPE_PARTS[shape]:
        if isinstance(part, tuple):  # a disc
            (x, y), rad = at(*part[:2]), SS * r * part[2]
            draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=255 * ink)
        else:
            draw.polygon([at(x, y) for x, y in part], fill=255 * ink)
    return np.asarray(im, np.float32) / 255


def texture_ink(texture: str, rng: np.random.Generator, period: float, angle: float) -> np.ndarray:
    """(N, N) ink coverage of a full-frame texture with the given period (image pixels) and angle."""
    c, s = math.cos(angle), math.sin(angle)
    u = (_XX - RES / 2) * c + (_YY - RES / 2) * s + rng.uniform(0, period)  # rotated, randomly shifted axes
    v = (_YY - RES / 2) * c - (_XX - RES / 2) * s + rng.uniform(0, period)
    fu, fv = (u / period) % 1, (v / period) % 1
    if texture == "striped":
        ink = fu < 0.5
    elif texture == "checkered":
        ink = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    elif texture == "dotted":
        ink = (fu - 0.5) ** 2 + (fv - 0.5) ** 2 < 0.09
    elif texture == "grid":
        ink = (fu < 0.25) | (fv < 0.25)
    elif texture == "crosshatched":
        ink = ((u + v) / (1.4 * period) % 1 < 0.2) | ((u - v) / (1.4 * period) % 1 < 0.2)
    elif texture == "wavy":
        ink = (v / period + 0.5 * np.sin(np.pi * u / period)) % 1 < 0.5
    elif texture == "zigzag":
        ink = (v / period + 1.6 * np.abs(fu - 0.5)) % 1 < 0.5
    elif texture == "bullseye":
        ink = np.hypot(_XX - RES / 2 - rng.uniform(-3, 3), _YY - RES / 2 - rng.uniform(-3, 3)) / period % 1 < 0.5
    elif texture == "brick":
        ink = (fv < 0.25) | ((u / period + np.floor(v / period)) / 2 % 1 < 0.12)
    elif texture == "speckled":
        ink = np.kron(rng.random((RES, RES)) < 0.18, np.ones((SS, SS))) > 0
    elif texture == "spotted":
        ink = np.zeros((N, N), bool)
        for _ in range(rng.integers(4, 8)):
            x, y, rad = rng.uniform(0, RES), rng.uniform(0, RES), rng.uniform(0.4, 0.8) * period
            ink |= (_XX - x) ** 2 + (_YY - y) ** 2 < rad ** 2
    elif texture == "gradient":
        return np.clip(u / RES + 0.5, 0, 1)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return ink.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _glyph(digit: str) -> Image.Image:
    """A digit in PIL's default font, cropped to its ink (scaled to size when drawn)."""
    try:
        font = ImageFont.load_default(size=96)
    except TypeError:  # Pillow < 10.1: the small bitmap font, scaled up below
        font = ImageFont.load_default()
    im = Image.new("L", (160, 160))
    ImageDraw.Draw(im).text((20, 10), digit, font=font, fill=255)
    return im.crop(im.getbbox())


def glyph_mask(digit: str, cx: float, cy: float, r: float) -> np.ndarray:
    g = _glyph(digit)
    h = int(2 * r * SS)
    w = max(1, round(h * g.width / g.height))
    out = Image.new("L", (N, N))
    out.paste(g.resize((w, h), Image.BILINEAR), (int(SS * cx - w / 2), int(SS * cy - h / 2)))
    return np.asarray(out, np.float32) / 255


def _tone(rng: np.random.Generator, colour: str) -> np.ndarray:
    """A palette colour with a little per-picture jitter, floats in [0, 255]."""
    return np.clip(np.array(COLOURS[colour], np.float32) + rng.normal(0, 10, 3), 0, 255)


def _background(kind: str, rng: np.random.Generator, ink: np.ndarray) -> np.ndarray:
    """(RES, RES, 3) background; coloured, gradient and cloudy ones keep their mean away from `ink`."""
    for _ in range(20):
        if kind in ("dark", "light"):  # sample_spec never pairs these with an ink of the same brightness
            a = b = rng.uniform(0, 60, 3) if kind == "dark" else rng.uniform(195, 255, 3)
            break
        if kind == "coloured":
            a = b = 0.5 * _tone(rng, rng.choice(list(COLOURS))) + rng.uniform(0, 127)
        elif kind == "gradient":
            a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        else:  # cloudy: a tone and a nearby one
            a = rng.uniform(0, 255, 3)
            b = np.clip(a + rng.uniform(-80, 80, 3), 0, 255)
        if np.abs((a + b) / 2 - ink).sum() > 150:
            break
    if kind == "gradient":
        t = _box(texture_ink("gradient", rng, 1.0, rng.uniform(0, 2 * np.pi)))
    elif kind == "cloudy":  # mixed by a smooth random field: 4 x 4 random values upsampled bicubically
        coarse = Image.fromarray((rng.random((4, 4)) * 255).astype(np.uint8))
        t = np.asarray(coarse.resize((RES, RES), Image.BICUBIC), np.float32) / 255
    else:
        t = np.zeros((RES, RES), np.float32)
    return a * (1 - t[..., None]) + b * t[..., None]


def sample_spec(rng: np.random.Generator, domain: str = "pretrain", **fixed) -> dict:
    """Draw a picture's attributes in `domain`; `fixed` pins some (e.g. kind="object", shape="star")."""
    dom = DOMAINS[domain]
    kind = fixed.get("kind") or str(rng.choice(["object", "pattern", "glyph"], p=[0.65, 0.3, 0.05]))
    spec = dict(kind=kind, domain=domain, noise=rng.uniform(*dom["noise"]))
    if kind == "pattern":
        texture = fixed.get("texture") or rng.choice(TEXTURES)
        turn = 0 if texture in ("grid", "crosshatched") else rng.choice([0, 45, 90, 135])  # a turned grid is
        spec.update(texture=texture, colours=tuple(rng.choice(list(COLOURS), 2, replace=False)),  # crosshatched
                    period=rng.uniform(*dom["period"]), angle=np.deg2rad(turn + rng.uniform(-1, 1) * dom["angle"]))
    else:
        z = rng.random()  # size in [0, 1]; the bottom and top quarters are "small" and "large"
        spec.update(colour="grey" if rng.random() < 0.2 else rng.choice(list(COLOURS)),
                    background=rng.choice(dom["backgrounds"]), size="small" if z < .25 else "large" if z > .75 else "",
                    r=(4.5 + 2.5 * z) if kind == "glyph" else (7 + 6.5 * z),
                    position=rng.choice(list(POSITIONS), p=[0.8, 0.05, 0.05, 0.05, 0.05]),
                    angle=np.deg2rad(rng.uniform(-1, 1) * dom["angle"]))
        if kind == "object":
            spec.update(shape=rng.choice(SHAPES), fill=rng.choice(FILLS, p=[0.8, 0.2 / 3, 0.2 / 3, 0.2 / 3]),
                        period=0.7 * rng.uniform(*dom["period"]))
        else:
            spec.update(digit=str(rng.integers(10)))
    spec.update(fixed)
    if spec.get("background") == "dark" and spec["colour"] in ("black", "brown", "purple", "blue"):
        spec["background"] = "light"  # keep the ink visible
    elif spec.get("background") == "light" and spec["colour"] in ("white", "yellow"):
        spec["background"] = "dark"
    if dom["light"]:
        spec["light"] = 1 + rng.uniform(-1, 1, 3) * dom["light"]  # per-channel gain of a coloured light
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in spec.items()}


def render(spec: dict, rng: np.random.Generator) -> np.ndarray:
    """Draw `spec` as a (RES, RES, 3) uint8 array. Masks are supersampled and box-filtered; colours are
    mixed at the final resolution (the same result for flat colours, and much cheaper)."""
    if spec["kind"] == "pattern":
        c1, c2 = (_tone(rng, c) for c in spec["colours"])
        k = rng.uniform(DOMAINS[spec["domain"]]["fade"], 1.0) / 2  # < 0.5: the two colours fade together
        c1, c2 = (c1 + c2) / 2 + k * (c1 - c2), (c1 + c2) / 2 - k * (c1 - c2)
        t = _box(texture_ink(spec["texture"], rng, spec["period"], spec["angle"]))[..., None]  # (RES, RES, 1)
        img = c1 * (1 - t) + c2 * t
    else:
        dx, dy = POSITIONS[spec["position"]]
        r = spec["r"]
        cx = RES / 2 + dx * (RES / 2 - r - 1) + rng.uniform(-1.5, 1.5)
        cy = RES / 2 + dy * (RES / 2 - r - 1) + rng.uniform(-1.5, 1.5)
        fg = _tone(rng, spec["colour"])
        mask = (glyph_mask(spec["digit"], cx, cy, r) if spec["kind"] == "glyph"
                else shape_mask(spec["shape"], cx, cy, r, spec["angle"]))
        m = _box(mask)[..., None]  # (RES, RES, 1)
        img = _background(spec["background"], rng, fg) * (1 - m) + fg * m
        if spec.get("fill", "solid") != "solid":  # the fill's ink is black or white, whichever contrasts
            other = np.full(3, 20.0 if fg.mean() > 110 else 235.0, np.float32)
            t = texture_ink(spec["fill"], rng, spec["period"], rng.choice([0, np.pi / 4, np.pi / 2]))
            img = img + (other - fg) * _box(mask * t)[..., None]
    if "light" in spec:
        img = img * np.asarray(spec["light"], np.float32)
    img = img + rng.normal(0, 255 * spec["noise"], img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- captions

OBJECT_FORMS = ["{}", "{}", "a photo of {}.", "a picture of {}.", "an image of {}", "a drawing of {}.",
                "there is {}", "{} on a {background} background", "{} in the {position}"]
PATTERN_FORMS = ["{} pattern", "{} pattern", "a photo of {} pattern.", "{} texture", "an image of {} pattern",
                 "a picture of {} pattern."]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(spec: dict, rng: np.random.Generator) -> tuple[str, dict]:
    """A caption of `spec` and its claims: the attributes it states, all of which must hold for a match."""
    p = rng.random
    if spec["kind"] == "pattern":
        claims, words = {"texture": spec["texture"]}, spec["texture"]
        if p() < 0.3:
            claims["colours"] = frozenset(spec["colours"])
            words = f"{spec['colours'][0]} and {spec['colours'][1]} {words}"
        form = rng.choice(PATTERN_FORMS)
        return form.format(_a(words)), claims
    claims = {"kind": spec["kind"]}
    if spec["kind"] == "glyph":
        claims["digit"] = spec["digit"]
        noun = rng.choice(["digit ", "number "]) + spec["digit"]
    else:
        claims["shape"] = noun = spec["shape"]
        if spec["fill"] != "solid" and p() < 0.6:
            claims["fill"] = spec["fill"]
            noun = f"{spec['fill']} {noun}"
    if p() < 0.45:
        claims["colour"] = spec["colour"]
        noun = f"{spec['colour']} {noun}"
    if spec["size"] and p() < 0.25:
        claims["size"] = spec["size"]
        noun = f"{spec['size']} {noun}"
    phrase = "the " + noun if spec["kind"] == "glyph" and p() < 0.5 else _a(noun)
    form = rng.choice(OBJECT_FORMS)
    claims.update({k: spec[k] for k in ("background", "position") if "{" + k + "}" in form})
    return form.format(phrase, background=spec.get("background"), position=spec.get("position")), claims


def positives(specs: list[dict], claims: list[dict]) -> np.ndarray:
    """(B, B) bool: [i, j] is True when caption j is true of picture i (every claim of j holds for i)."""
    def value(spec: dict, key: str):
        return frozenset(spec[key]) if key == "colours" and key in spec else spec.get(key)
    out = np.ones((len(specs), len(claims)), bool)
    for key in {k for c in claims for k in c}:
        column = np.empty(len(specs), object)  # (B,) the pictures' values of `key`
        column[:] = [value(s, key) for s in specs]
        for j, c in enumerate(claims):
            if key in c:
                out[:, j] &= column == c[key]
    return out


def world_batch(seed: int, step: int, size: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Batch `step` of the pretraining stream: images (B, RES, RES, 3) uint8, captions, positives (B, B)."""
    rng = np.random.default_rng([seed, step])
    specs = [sample_spec(rng) for _ in range(size)]
    images = np.stack([render(s, rng) for s in specs])
    texts, claims = zip(*(caption(s, rng) for s in specs))
    return images, list(texts), positives(specs, list(claims))


# ----------------------------------------------------------------------------- pretraining

def cache_dir() -> Path:
    return Path(os.environ.get("CP_DEMO_DIR") or Path.home() / ".cache" / "calibrated-prompts" / "demo")


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock file next to `path`, so concurrent runs build a cache entry once."""
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _tune_malloc() -> None:
    """Keep freed memory in the process (as MALLOC_TRIM_THRESHOLD_ etc. would): glibc's defaults give it back
    after every step and page-fault it in again, which made AdamW several times slower on small VMs."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc
    for option, value in ((-1, 2 ** 31 - 1), (-2, 2 ** 30), (-3, 2 ** 25)):  # TRIM_THRESHOLD, TOP_PAD, MMAP_THRESHOLD
        libc.mallopt(option, value)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W), as clip.load's preprocess does."""
    return torch.from_numpy(((images.astype(np.float32) / 255 - MEAN) / STD).transpose(0, 3, 1, 2).copy())


def _train(model, seed: int, steps: int, log) -> None:
    """AdamW on the multi-positive contrastive loss, over batches 0..steps-1 of the world stream."""
    matrices = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    others = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}]
    try:  # the fused CPU kernel (torch >= 2.4) is 3x faster over the 6M-entry token embedding
        opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.98), eps=1e-6, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to zero
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    # Token ids are cached as tuples: a cache of many tiny tensors fragmented the heap (+20 MB per step).
    tokens_of = functools.lru_cache(maxsize=None)(
        lambda t: tuple(clip.tokenize(t, context_length=model.context_length)[0].tolist()))
    start, running = time.time(), 0.0
    with ThreadPoolExecutor(1) as pool:  # draws the next batch on the other core while torch trains
        upcoming = pool.submit(world_batch, seed, 0, BATCH)
        for step in range(steps):
            images, texts, pos = upcoming.result()
            if step + 1 < steps:
                upcoming = pool.submit(world_batch, seed, step + 1, BATCH)
            img = F.normalize(model.encode_image(to_tensor(images)), dim=-1)  # (B, E)
            tokens = clip.trim(torch.tensor([tokens_of(t) for t in texts]))  # (B, L): cut after the last EOT
            txt = F.normalize(model.encode_text(tokens), dim=-1)  # (B, E)
            logits = model.logit_scale.exp() * img @ txt.t()  # (B images, B captions)
            target = torch.from_numpy(pos).float()  # every true caption is a positive, not only the diagonal
            loss = -0.5 * ((target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
                           + (target / target.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running = loss.item() if step == 0 else 0.95 * running + 0.05 * loss.item()
            if step % 100 == 0 or step == steps - 1:
                log(f"pretrain step {step + 1}/{steps}  loss {running:.3f}  {time.time() - start:.0f}s")


def pretrain(seed: int = 0, steps: int = STEPS, log=None) -> dict[str, torch.Tensor]:
    """Pretrain the tiny CLIP on the world; returns its fp32 state dict.

    Deterministic on a given machine and software: seeded, deterministic algorithms, and one torch thread,
    whatever the caller's thread settings (two threads were also several times slower, not faster, whenever
    another process shared the cores); the caller's thread count and determinism flag are restored. CPU
    kernels of other processors or library versions round differently, which is why the repository ships
    the result (`SHIPPED`) instead of pretraining on every machine.

    Token embedding rows of the ~80 tokens that never occur in the world's captions get no gradient, so they
    would keep their random initial values; they are set to zero, so the model maps unseen words to nothing
    rather than to noise, and the shipped file need not store them.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    _tune_malloc()
    start = time.time()
    try:
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(seed)
        model = tiny_clip(**MODEL_SIZES).train()
        # CLIP's logit scale is 100 (its cap, reached in pretraining), and the recipes assume it: margins are
        # taken on x100 logits and lambda_mom is weighed against that cross-entropy. A learned scale only
        # reached 17 here, and prompt tuning then collapsed on several demo seeds; so it is fixed at 100.
        with torch.no_grad():
            model.logit_scale.fill_(math.log(100))
        model.logit_scale.requires_grad_(False)
        initial = model.token_embedding.weight.detach().clone()  # (V, D)
        _train(model, seed, steps, log)
        with torch.no_grad():
            model.token_embedding.weight[(model.token_embedding.weight == initial).all(dim=1)] = 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    log(f"pretrained the tiny CLIP in {time.time() - start:.0f}s")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_state(state: dict, path: Path | str) -> None:
    """The shipped form, written like a prompt checkpoint (`eval.save_prompt`: atomically, through a file
    object, so torch names the archive inside the zip "archive", not after the file: the same bytes for the
    same state)."""
    evaluation.save_prompt(state, path)


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash of the names, dtypes, shapes and values of a state dict (not of a file's bytes)."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        h.update(f"{k} {v.dtype} {tuple(v.shape)}".encode())
        h.update(v.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pack(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shipped form: fp16 (the logit scale fp32, so it stays exactly 100), and of the token embedding
    only its non-zero rows and their ids."""
    emb = state["token_embedding.weight"]  # (V, D)
    ids = emb.ne(0).any(dim=1).nonzero()[:, 0]  # (T,) the tokens pretraining trained
    out = {k: v if k == "logit_scale" else v.half() for k, v in state.items() if k != "token_embedding.weight"}
    out.update({"token_embedding.ids": ids, "token_embedding.rows": emb[ids].half(),  # (T,), (T, D)
                "token_embedding.shape": torch.tensor(emb.shape)})
    return out


def unpack(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`pack`'s inverse, up to its fp16 rounding: a plain fp32 state dict that clip.load reads."""
    rows = {k: packed[f"token_embedding.{k}"] for k in ("ids", "rows", "shape")}
    out = {k: v.float() for k, v in packed.items() if not k.startswith("token_embedding.")}
    weight = torch.zeros(rows["shape"].tolist())  # (V, D)
    out["token_embedding.weight"] = weight.index_copy_(0, rows["ids"], rows["rows"].float())
    return out


class ShippedCheckpointError(data.UserError, RuntimeError):
    """The shipped tiny CLIP is missing or is not the file this demo.py was written for."""


def read_shipped(path: Path | str | None = None, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The shipped checkpoint (default SHIPPED), unpacked, after checking the file's sha256."""
    path, sha256 = Path(path or SHIPPED), sha256 or SHIPPED_SHA256
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ShippedCheckpointError(f"cannot read the demo's tiny CLIP {path} ({e.strerror}); restore it with "
                                     f"`git checkout -- {path.name}` in {path.parent}") from e
    found = hashlib.sha256(raw).hexdigest()
    if found != sha256:
        raise ShippedCheckpointError(
            f"the demo's tiny CLIP {path} has sha256 {found[:16]}..., demo.py expects {sha256[:16]}...; restore "
            f"it with `git checkout -- {path.name}` in {path.parent} (a Git LFS pointer or a line-ending filter "
            "also changes it), or after `python demo.py pretrain` set SHIPPED_SHA256 to the hash it prints")
    return unpack(torch.load(io.BytesIO(raw), weights_only=True))


def backbone() -> Path:
    """The shipped tiny CLIP as a plain fp32 state dict for clip.load, unpacked into the cache on first use."""
    path = cache_dir() / f"tiny_clip_v{VERSION}_{SHIPPED_SHA256[:12]}.pt"  # a new shipped file, a new name
    with _locked(path):
        if not path.is_file():
            save_state(read_shipped(), path)
    return path


# ----------------------------------------------------------------------------- demo datasets

_SHAPE_PAIRS = [(c, s) for c in range(5) for s in range(4)]  # (colour, shape) indices of demo_colours
_COLOURS5, _SHAPES4 = ["red", "yellow", "green", "blue", "purple"], ["circle", "square", "triangle", "star"]
# key -> (CoOp-style name, drawing domain, [(class name, pinned attributes)] in label order). The first half
# of the labels is base; each half holds one of every look-alike pair.
DEMO = {
    "demo_shapes": ("DemoShapes", "shapes", [(s, dict(kind="object", shape=s, fill="solid")) for s in [
        "circle", "triangle", "cross", "heart", "moon", "frame", "square", "star", "ring", "diamond", "arrow",
        "hourglass"]]),
    "demo_colours": ("DemoColours", "colours", [
        (f"{_COLOURS5[c]} {_SHAPES4[s]}", dict(kind="object", colour=_COLOURS5[c], shape=_SHAPES4[s], fill="solid"))
        for half in (0, 1) for c, s in _SHAPE_PAIRS if (c + s) % 2 == half]),  # a checkerboard over the grid
    "demo_patterns": ("DemoPatterns", "patterns", [(f"{t} pattern", dict(kind="pattern", texture=t)) for t in [
        "striped", "dotted", "zigzag", "brick", "spotted", "gradient", "checkered", "grid", "wavy", "bullseye",
        "speckled", "crosshatched"]]),
}
SPLIT_SIZES = {"train": 32, "val": 8, "test": 40}  # images per class: >= 16 shots to draw from, val >= 4
DATA_SEED = 2024


def dataset_image(key: str, label: int, split: str, i: int) -> np.ndarray:
    """Image i of class `label` in `split` of demo dataset `key`: a pure function, (RES, RES, 3) uint8."""
    _, domain, classes = DEMO[key]
    rng = np.random.default_rng([DATA_SEED, list(DEMO).index(key), label, list(SPLIT_SIZES).index(split), i])
    return render(sample_spec(rng, domain, **classes[label][1]), rng)


def default_root() -> Path:
    return cache_dir() / f"data_v{VERSION}"


def write_datasets(root: Path | str | None = None, log=None) -> Path:
    """Write every demo dataset missing under `root` in CoOp's split-file layout; return the root."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    root = Path(root or default_root())
    for key, (name, _, classes) in DEMO.items():
        folder, split_file = root / key, f"split_zhou_{name}.json"
        with _locked(folder):
            if (folder / split_file).is_file():
                continue
            if folder.exists():
                raise RuntimeError(f"{folder} exists without {split_file}: remove it and rerun to rewrite it")
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
            split = {s: [] for s in SPLIT_SIZES}
            for label, (classname, _) in enumerate(classes):
                cls = classname.replace(" ", "_")  # as in CoOp's files; the readers turn "_" into spaces
                (tmp / "images" / cls).mkdir(parents=True)
                for s, n in SPLIT_SIZES.items():
                    for i in range(n):
                        Image.fromarray(dataset_image(key, label, s, i)).save(tmp / "images" / cls / f"{s}_{i:03d}.png")
                        split[s].append([f"{cls}/{s}_{i:03d}.png", label, cls])
            (tmp / split_file).write_text(json.dumps(split))
            os.chmod(tmp, 0o755)
            os.rename(tmp, folder)  # atomic: the folder appears complete or not at all
        log(f"wrote {key}: {len(classes)} classes, {sum(map(len, split.values()))} images -> {folder}")
    return root


# ----------------------------------------------------------------------------- zero-shot check

@torch.no_grad()
def zeroshot(root: Path | str | None = None, checkpoint: Path | str | None = None) -> list[dict]:
    """Zero-shot accuracy (percent) on the base and novel test classes of each demo dataset, read, split,
    prompted ("a photo of a {}.") and transformed by data.py exactly as the methods do."""
    root = Path(root or default_root())
    model, _ = clip.load(str(checkpoint or backbone()), device="cpu")
    transform = data.test_transform(model.visual.input_resolution)
    rows = []
    for key in DEMO:
        row, full = {"dataset": key}, data.load_dataset(key, root)
        for half, which in (("base", "base"), ("novel", "new")):
            split = data.subsample_classes(full, which)
            text = evaluation.text_features(model, data.prompts(key, split.classnames))  # (C, E), normalised
            images = torch.stack([transform(data.load_image(d.impath)) for d in split.test])  # (M, 3, RES, RES)
            pred = (F.normalize(model.encode_image(images), dim=-1) @ text.t()).argmax(1)
            acc = 100 * (pred == torch.tensor([d.label for d in split.test])).float().mean().item()
            k = len(split.classnames)
            row.update({f"{half}_acc": acc, f"{half}_chance": 100 / k, f"{half}_classes": k})
        rows.append(row)
    return rows


def linear_probe(root: Path | str | None = None, checkpoint: Path | str | None = None, shots: int = 16,
                 seed: int = 1, steps: int = 300) -> dict[str, float]:
    """Base-class test accuracy (percent) of a linear classifier on the frozen image features, per dataset.

    A ceiling check for every text-side method: the classifier starts at the zero-shot one (logit scale x
    the template's text features), is fitted to the same few-shot training images the methods see (seed
    `seed`, no augmentation) with Adam and a small L2 penalty, and is tested on the base test split.
    """
    root = Path(root or default_root())
    model, _ = clip.load(str(checkpoint or backbone()), device="cpu")
    transform = data.test_transform(model.visual.input_resolution)

    def encode(items):
        images = torch.stack([transform(data.load_image(d.impath)) for d in items])  # (M, 3, RES, RES)
        with torch.no_grad():
            return F.normalize(model.encode_image(images), dim=-1), torch.tensor([d.label for d in items])

    out = {}
    for key in DEMO:
        base, _ = data.base_to_novel(key, root, shots, seed)
        (x, y), (x_test, y_test) = encode(base.train), encode(base.test)
        text = evaluation.text_features(model, data.prompts(key, base.classnames))  # (C, E)
        weight = (model.logit_scale.exp().detach() * text).requires_grad_(True)  # (C, E)
        opt = torch.optim.Adam([weight], lr=0.05)
        for _ in range(steps):
            loss = F.cross_entropy(x @ weight.t(), y) + 1e-3 * weight.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[key] = 100 * ((x_test @ weight.detach().t()).argmax(1) == y_test).float().mean().item()
    return out


def format_zeroshot(rows: list[dict]) -> str:
    lines = ["dataset        classes  base acc  chance  ratio | novel acc  chance  ratio"]
    for r in rows:
        lines.append(f"{r['dataset']:<14} {r['base_classes']:>3}+{r['novel_classes']:<3} {r['base_acc']:8.1f} "
                     f"{r['base_chance']:7.1f} {r['base_acc'] / r['base_chance']:5.1f}x | {r['novel_acc']:9.1f} "
                     f"{r['novel_chance']:7.1f} {r['novel_acc'] / r['novel_chance']:5.1f}x")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def machine() -> str:
    """What the figures were measured on: processor, cores, Python, torch and its BLAS."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    blas = "MKL" if torch.backends.mkl.is_available() else "no MKL"
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}, torch "
            f"{torch.__version__} ({blas}, CPU capability {torch.backends.cpu.get_cpu_capability()})")


def report(runs: Path | str, root: Path | str | None = None, checkpoint: Path | str | None = None) -> str:
    """The demo tables: zero-shot and the linear probe (the README's), then every method x calibration in the
    run.sh output `runs` (e.g. output/demo) as the range over seeds of base / novel accuracy and ECE (those of
    BENCHMARKS.md, "The demo world across seeds and machines")."""
    ckpt, root = checkpoint or backbone(), root or write_datasets()
    zs = {r["dataset"]: r for r in zeroshot(root, ckpt)}
    probe = linear_probe(root, ckpt)
    lines = [f"Measured on: {machine()}", f"Tiny CLIP: {SHIPPED.name} (sha256 {SHIPPED_SHA256[:12]}...)", "",
             "| dataset | classes (base+novel) | zero-shot base acc | novel acc | chance | linear probe, base |",
             "|---|---|---|---|---|---|"]
    for key, r in zs.items():
        lines.append(f"| {key} | {r['base_classes']}+{r['novel_classes']} | {r['base_acc']:.1f} | {r['novel_acc']:.1f} "
                     f"| {r['base_chance']:.1f} | {probe[key]:.1f} |")
    records, _ = evaluation.load_results(runs)
    groups: dict[tuple, dict[str, list]] = {}
    for rec in records:
        if rec.get("demo") and rec.get("protocol") == "base2new":
            runs_of = groups.setdefault((rec["method"], rec["calib"], rec["dataset"]), {})
            for split in ("base", "novel"):
                for metric in ("acc", "ece"):
                    runs_of.setdefault(f"{split}_{metric}", []).append(rec["metrics"][split]["raw"][metric])
            runs_of.setdefault("seeds", []).append(rec["seed"])
    if groups:
        lines += ["", "Ranges over seeds (min-max), raw logits:", "",
                  "| method | calib | dataset | seeds | base acc | novel acc | base ECE | novel ECE |",
                  "|---|---|---|---|---|---|---|---|"]
        for (method, calib, key), v in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], list(DEMO).index(
                kv[0][2]) if kv[0][2] in DEMO else 99)):
            cells = [f"{min(v[c]):.1f}-{max(v[c]):.1f}" for c in ("base_acc", "novel_acc", "base_ece", "novel_ece")]
            lines.append(f"| {method} | {calib} | {key} | {len(v['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    # The scripts' parser: each default stated once, a command-line error is one `error:` line (exit 2).
    parser = evaluation.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text)

    def root_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--root", help=f"data root (default: {default_root()})")

    pretrain_cmd = command("pretrain", "pretrain the tiny CLIP from scratch (minutes) and write it in the shipped "
                           "form; prints its sha256, for SHIPPED_SHA256")
    pretrain_cmd.add_argument("--steps", type=evaluation.at_least(1), default=STEPS, help=f"training steps (default: {STEPS}, as "
                              "for the shipped model)")
    pretrain_cmd.add_argument("--out", default=str(SHIPPED), help="where to write it (default: the shipped file, "
                              f"{SHIPPED.relative_to(SHIPPED.parent.parent)})")
    root_option(command("datasets", "write the missing demo datasets; print the data root"))
    root_option(command("prepare", "unpack the shipped tiny CLIP and write the missing datasets; print "
                                   "DEMO_ROOT=... and DEMO_BACKBONE=..."))
    zeroshot_cmd = command("zeroshot", "print the tiny CLIP's zero-shot base/novel accuracy on the demo datasets")
    root_option(zeroshot_cmd)
    zeroshot_cmd.add_argument("--probe", action="store_true", help="also print the base-class accuracy of a linear "
                              "probe on the frozen image features (16 shots, seed 1): the ceiling for text-side "
                              "prompt tuning")
    report_cmd = command("report", "print the demo tables (README, BENCHMARKS.md) from a run.sh output folder")
    root_option(report_cmd)
    report_cmd.add_argument("runs", help="run.sh's demo output, e.g. output/demo")
    args = parser.parse_args(argv)
    if args.command == "pretrain":
        state = pretrain(steps=args.steps)
        save_state(pack(state), args.out)
        print(f"weights sha256 {state_sha256(state)}")
        raw = Path(args.out).read_bytes()
        print(f"wrote {args.out} ({len(raw)} bytes), sha256 {hashlib.sha256(raw).hexdigest()}")
        return
    if args.command == "datasets":
        print(write_datasets(args.root))
    elif args.command == "prepare":  # stdout is for `eval "$(python demo.py prepare)"`; progress goes to stderr
        ckpt, root = backbone(), write_datasets(args.root)
        print(f"DEMO_ROOT={shlex.quote(str(root))}\nDEMO_BACKBONE={shlex.quote(str(ckpt))}")
    elif args.command == "report":
        if not Path(args.runs).is_dir():
            raise data.UserError(f"no folder {args.runs}, the run.sh output to report on; run `bash run.sh coop` "
                                 "first (with no data it runs the demo world into output/demo)")
        print(report(args.runs, args.root))
    else:
        ckpt, root = backbone(), write_datasets(args.root)
        print(f"zero-shot accuracy (%), template {data.template(next(iter(DEMO)))!r}, checkpoint {ckpt}, "
              f"data {root}")
        print(format_zeroshot(zeroshot(root, ckpt)))
        if args.probe:
            probe = linear_probe(root, ckpt)
            print("linear probe, base test accuracy (%): " + ", ".join(f"{k} {v:.1f}" for k, v in probe.items()))


if __name__ == "__main__":
    with evaluation.user_errors():
        main()
