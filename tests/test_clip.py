"""clip/: checkpoints load strictly and round-trip, tokens match OpenAI's, downloads are hash-checked."""
import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import clip
from clip import clip as clip_impl
from clip.model import CLIP, build_model, tiny_clip

FIXTURES = Path(__file__).with_name("fixtures")


def _outputs(model, image, text):
    with torch.no_grad():
        return model.encode_image(image), model.encode_text(text)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tiny_clip(context_length=16).eval()


def test_state_dict_round_trip_through_load(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    loaded, preprocess = clip.load(str(path), device="cpu")
    image, text = torch.randn(2, 3, 32, 32), clip.tokenize(["a red circle", "a dog"], context_length=16)
    for a, b in zip(_outputs(tiny, image, text), _outputs(loaded, image, text)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded.context_length == 16 and loaded.visual.input_resolution == 32
    # A dict holding the state dict under "state_dict" (training checkpoints) loads too.
    torch.save({"state_dict": tiny.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    wrapped, _ = clip.load(str(tmp_path / "wrapped.pt"), device="cpu")
    torch.testing.assert_close(_outputs(wrapped, image, text)[1], _outputs(tiny, image, text)[1], rtol=0, atol=0)


def test_torchscript_archive_with_extra_integer_entries(tiny, tmp_path):
    """The official files are traced TorchScript archives whose state dict carries three integer entries."""
    image, text = torch.randn(1, 3, 32, 32), clip.tokenize(["a photo of a cat"], context_length=16)

    class Archived(torch.nn.Module):
        """Same top-level names as CLIP, plus the integer entries; forward delegates to the model."""

        def __init__(self, model):
            super().__init__()
            for name, child in model.named_children():
                self.add_module(name, child)
            for name, param in model.named_parameters(recurse=False):
                self.register_parameter(name, param)
            for name, value in (("input_resolution", 32), ("context_length", 16), ("vocab_size", 49408)):
                self.register_buffer(name, torch.tensor(value))
            self._model = [model]  # a list hides it from the module tree

        def forward(self, image, text):
            return self._model[0](image, text)

    traced_source = Archived(tiny)
    traced = torch.jit.trace(traced_source, (image, text), check_trace=False)
    path = tmp_path / "archive.pt"
    traced.save(str(path))
    assert "input_resolution" in torch.jit.load(str(path)).state_dict()
    loaded, _ = clip.load(str(path), device="cpu")
    for a, b in zip(_outputs(tiny, image, text), _outputs(loaded, image, text)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_build_model_does_not_modify_its_input(tiny):
    sd = dict(tiny.state_dict())
    sd["input_resolution"] = torch.tensor(32)
    keys = set(sd)
    build_model(sd)
    assert set(sd) == keys


def test_bad_checkpoints_give_clear_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="junk.pt"):
        clip.load(str(tmp_path / "junk.pt"), device="cpu")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a CLIP state dict"):
        clip.load(str(tmp_path / "other.pt"), device="cpu")
    with pytest.raises(RuntimeError, match="not found"):
        clip.load(str(tmp_path / "missing.pt"), device="cpu")


@pytest.mark.parametrize("name", ["ViT-B/16", "RN50"])
def test_official_sized_checkpoints_load_strictly(name):
    """Random weights with the official architecture: build_model infers every size from the keys alone."""
    torch.manual_seed(0)
    if name == "ViT-B/16":
        model = CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)
        shapes = {"visual.positional_embedding": (197, 768), "visual.proj": (768, 512),
                  "visual.conv1.weight": (768, 3, 16, 16), "visual.transformer.resblocks.11.attn.in_proj_weight": (2304, 768),
                  "text_projection": (512, 512), "token_embedding.weight": (49408, 512), "positional_embedding": (77, 512)}
    else:
        model = CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12)
        shapes = {"visual.conv1.weight": (32, 3, 3, 3), "visual.attnpool.positional_embedding": (50, 2048),
                  "visual.attnpool.c_proj.weight": (1024, 2048), "visual.layer4.2.bn3.weight": (2048,),
                  "visual.layer1.0.downsample.0.weight": (256, 64, 1, 1), "text_projection": (512, 1024)}
    clip.model.convert_weights(model)  # the official files are fp16
    sd = model.state_dict()
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    rebuilt = build_model(sd)  # load_state_dict(strict=True) inside
    assert rebuilt.visual.input_resolution == 224 and rebuilt.context_length == 77
    assert rebuilt.text_projection.dtype == torch.float16
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in model.parameters())


def test_known_token_ids():
    tokens = clip.tokenize(["a diagram", "a photo of a"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert tokens[0, :5].tolist() == [49406, 320, 22697, 49407, 0]
    assert tokens[1, :6].tolist() == [49406, 320, 1125, 539, 320, 49407]
    assert tokens[0, 4:].abs().sum() == 0


def test_token_ids_match_reference_fixture():
    """Ids recorded from the PyPI port of OpenAI's tokenizer (open-clip-torch 3.3.0): unicode, HTML entities,
    odd whitespace, clitics, digits, mojibake and a 300-character word."""
    from clip.tokenizer import SimpleTokenizer
    tokenizer = SimpleTokenizer()
    expected = json.loads((FIXTURES / "token_ids.json").read_text(encoding="utf-8"))
    assert len(expected) >= 15
    for text, ids in expected.items():
        assert tokenizer.encode(text) == ids, text
    assert tokenizer.decode(tokenizer.encode("a photo of a dog.")).strip() == "a photo of a dog ."


def test_truncation_and_too_long_error():
    long_text = " ".join(["word"] * 100)
    with pytest.raises(RuntimeError, match="context length"):
        clip.tokenize(long_text)
    tokens = clip.tokenize(long_text, truncate=True)
    assert tokens.shape == (1, 77) and tokens[0, -1] == 49407 and tokens[0, 0] == 49406
    short = clip.tokenize(long_text, context_length=8, truncate=True)[0]
    assert short.tolist()[-1] == 49407 and (short != 0).all()


def test_trim_cuts_after_the_last_eot_and_keeps_the_features():
    torch.manual_seed(0)
    model = tiny_clip(context_length=77).eval()
    tokens = clip.tokenize(["a photo of a cat.", "a photo of an annual crop land field."])  # (2, 77)
    trimmed = clip.trim(tokens)
    eot_last = int((tokens[1] == 49407).nonzero())
    assert trimmed.shape == (2, eot_last + 1) and torch.equal(trimmed, tokens[:, : eot_last + 1])
    assert torch.equal(clip.trim(trimmed), trimmed)  # nothing left to cut
    with torch.no_grad():
        full, short = model.encode_text(tokens), model.encode_text(trimmed)
    # Causal attention: the padding after EOT never reaches the EOT feature; only float rounding differs.
    torch.testing.assert_close(short, full, rtol=0, atol=1e-5)


def test_preprocess_follows_model_resolution(tiny, tmp_path):
    torch.save(tiny.state_dict(), tmp_path / "tiny.pt")
    _, preprocess = clip.load(str(tmp_path / "tiny.pt"), device="cpu")
    image = Image.new("RGB", (60, 40), color=(255, 255, 255))
    x = preprocess(image)
    assert x.shape == (3, 32, 32)
    expected = torch.tensor([(1 - m) / s for m, s in zip(clip.MEAN, clip.STD)])
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected)
    assert preprocess(Image.new("L", (50, 50))).shape == (3, 32, 32)  # grey images become RGB


class _Server:
    """A local HTTP server over a folder, standing in for the checkpoint host."""

    def __init__(self, folder):
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *args: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.requests = 0
        original = handler.func.do_GET

        def counting_get(inner_self):
            self.requests += 1
            return original(inner_self)

        handler.func.do_GET = counting_get
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_is_hash_checked(tmp_path):
    payload = b"checkpoint bytes " * 1000
    sha = hashlib.sha256(payload).hexdigest()
    served = tmp_path / "served" / sha
    served.mkdir(parents=True)
    (served / "Model.pt").write_bytes(payload)
    cache = tmp_path / "cache"
    server = _Server(tmp_path / "served")
    try:
        url = f"{server.url}/{sha}/Model.pt"
        path = clip_impl._download(url, cache)
        assert path.read_bytes() == payload and server.requests == 1
        # A correct cached file is used without a request.
        assert clip_impl._download(url, cache) == path and server.requests == 1
        # A tampered cached file is rejected by its hash and fetched again.
        path.write_bytes(b"tampered")
        assert clip_impl._download(url, cache).read_bytes() == payload and server.requests == 2
        # Served bytes that do not match the hash in the URL never reach the final name.
        wrong = "0" * 64
        (tmp_path / "served" / wrong).mkdir()
        (tmp_path / "served" / wrong / "Bad.pt").write_bytes(payload)
        with pytest.raises(RuntimeError, match="SHA256"):
            clip_impl._download(f"{server.url}/{wrong}/Bad.pt", cache)
        assert sorted(p.name for p in cache.iterdir()) == ["Model.pt"]  # no partial files left
    finally:
        server.close()
    # With no server, the error says which file to put where.
    with pytest.raises(RuntimeError, match=str(cache / "Other.pt")):
        clip_impl._download(f"{server.url}/{sha}/Other.pt", cache)


def test_official_names_map_to_urls():
    assert len(clip.available_models()) == 9
    assert clip.MODELS["ViT-B/16"].endswith("/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt")
    assert clip.MODELS["ViT-L/14@336px"].endswith("/ViT-L-14-336px.pt")
