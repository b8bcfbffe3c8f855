"""Loading CLIP checkpoints (download, hash check, TorchScript or plain state dicts) and tokenizing text."""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
import warnings
from pathlib import Path
from typing import Callable, Union

import torch
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from tqdm import tqdm

from .model import CLIP, build_model
from .tokenizer import SimpleTokenizer

__all__ = ["available_models", "load", "tokenize", "MODELS", "CheckpointError"]


class CheckpointError(RuntimeError, ValueError):
    """A model name or checkpoint file that `load` cannot turn into a CLIP model (unknown, not downloadable,
    unreadable, or not a CLIP state dict); the message names the file."""

_BASE_URL = "https://openaipublic.azureedge.net/clip/models"
# name -> SHA256 of the official file; the hash is also a segment of its URL.
_SHA256 = {
    "RN50": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
    "RN101": "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
    "RN50x4": "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
    "RN50x16": "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa",
    "RN50x64": "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c",
    "ViT-B/32": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    "ViT-B/16": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    "ViT-L/14": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
    "ViT-L/14@336px": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
}
MODELS = {name: f"{_BASE_URL}/{sha}/{name.replace('/', '-').replace('@', '-')}.pt" for name, sha in _SHA256.items()}
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

_tokenizer: SimpleTokenizer | None = None


def available_models() -> list[str]:
    return list(MODELS)


def sha256_of(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(url: str, root: Path) -> Path:
    """Fetch `url` into `root`, verified against the SHA256 in the URL.

    The bytes stream into a temporary file in `root` that is renamed only once its hash matches, so an
    interrupted or corrupt download never leaves a file under the final name. A cached file whose hash
    is wrong is downloaded again (once).
    """
    root.mkdir(parents=True, exist_ok=True)
    expected = url.split("/")[-2]
    target = root / url.split("/")[-1]
    if target.is_file():
        if sha256_of(target) == expected:
            return target
        print(f"{target} exists but its SHA256 does not match {expected}; downloading it again")

    fd, tmp = tempfile.mkstemp(dir=root, prefix=target.name + ".", suffix=".part")
    try:
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=60) as source, os.fdopen(fd, "wb") as out:
                total = int(source.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="iB", unit_scale=True, unit_divisor=1024, desc=target.name) as bar:
                    for block in iter(lambda: source.read(1 << 20), b""):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
        except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
            raise CheckpointError(
                f"could not download {url} ({e}). Without network access, download that file elsewhere "
                f"and put it at {target} (or pass its path to clip.load / --backbone)") from None
        if h.hexdigest() != expected:
            raise CheckpointError(f"downloaded {url} but its SHA256 is {h.hexdigest()}, not {expected}; "
                               f"nothing was saved, try again")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _transform(n_px: int) -> Callable:
    return Compose([
        Resize(n_px, interpolation=InterpolationMode.BICUBIC),
        CenterCrop(n_px),
        lambda image: image.convert("RGB"),
        ToTensor(),
        Normalize(MEAN, STD),
    ])


def _read_state_dict(path: Path) -> dict:
    """State dict from a TorchScript archive (the official files), a plain state dict, or {"state_dict": ...}."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # newer torch marks torch.jit deprecated; the official files need it
            archive = torch.jit.load(str(path), map_location="cpu")
        return archive.state_dict()
    except RuntimeError:
        pass  # not a TorchScript archive: try an ordinary torch.save file
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        why = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0])
        raise CheckpointError(f"{path} is neither a TorchScript archive nor a torch.save file of tensors "
                              f"({why})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a CLIP state dict")
    return obj


def load(name: str, device: Union[str, torch.device, None] = None, jit: bool = False,
         download_root: Union[str, Path, None] = None) -> tuple[CLIP, Callable]:
    """Load a CLIP model by official name (downloaded and cached) or from a local file.

    Returns (model, preprocess): the model in eval mode on `device`, fp16 on CUDA as the official
    loader does and fp32 elsewhere; preprocess turns a PIL image into a normalised tensor at the
    model's input resolution. `jit=True` is not supported: our model is the plain nn.Module.
    """
    if jit:
        raise ValueError("jit=True is not supported: this package always builds the plain nn.Module model")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name in MODELS:
        root = Path(download_root or os.path.expanduser("~/.cache/clip"))
        path = _download(MODELS[name], root)
    elif os.path.isfile(name):
        path = Path(name)
    else:
        raise CheckpointError(f"model {name!r} not found: give one of {available_models()} or a checkpoint file path")

    state = _read_state_dict(path)
    try:
        model = build_model(state)
    except (KeyError, ValueError, RuntimeError) as e:  # missing keys, odd widths, shapes that do not fit
        raise CheckpointError(f"{path} is not a CLIP checkpoint this loader can build: {e}") from None
    model = model.to(device)
    if device.type != "cuda":
        model.float()  # fp16 matmuls are slow or unsupported off the GPU
    return model, _transform(model.visual.input_resolution)


def tokenize(texts: Union[str, list[str]], context_length: int = 77, truncate: bool = False) -> torch.LongTensor:
    """Token ids (N, context_length): SOT, the text's BPE ids, EOT, zero padding.

    A text longer than the context raises, unless `truncate`, which keeps the first tokens and makes the
    last kept token EOT (so the feature is still read at an EOT position).
    """
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = SimpleTokenizer()
    if isinstance(texts, str):
        texts = [texts]
    sot, eot = _tokenizer.encoder["<|startoftext|>"], _tokenizer.encoder["<|endoftext|>"]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [sot] + _tokenizer.encode(text) + [eot]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(f"input {text!r} is {len(ids)} tokens long, more than the context length "
                                   f"{context_length}; pass truncate=True to cut it")
            ids = ids[:context_length]
            ids[-1] = eot
        result[i, : len(ids)] = torch.tensor(ids)
    return result


def trim(tokens: torch.Tensor) -> torch.Tensor:
    """Token ids (N, L) cut after the last end-of-text token of the batch: (N, L') with L' <= L.

    The text transformer is causal, so no token up to a prompt's EOT attends to the padding after it: the
    features read at EOT are the same (up to float rounding, ~1e-6) and a prompt of 20 tokens costs about a
    quarter of the 77-token forward and backward. Reads one integer to the host; call it when a class list is
    tokenised, not inside a training step.
    """
    return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]  # EOT has the largest id in every row
