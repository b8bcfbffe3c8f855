"""Checkpoints as the official trainers write them load without --allow-pickle and evaluate exactly as their
tensors do, and a pickled foreign callable never runs.

After training, the Dassl trainers (CoOp, CoCoOp, KgCoOp, ProGrad, MaPLe, PromptSRC) and DAC's ProDA save
{"state_dict", "epoch", "optimizer", "scheduler", "val_result"} with torch.save to
OUTPUT/<registered model name>/model.pth.tar-<epoch>. "scheduler" is the state dict of Dassl's warm-up scheduler,
which holds its successor, a CosineAnnealingLR, as an attribute: the successor is pickled whole, with the SGD
optimizer it drives, whose `state` is a defaultdict of momentum buffers keyed by the parameters themselves. The
files here are built that way after real SGD steps (momentum 0.9, weight decay 5e-4), the learned tensors in
fp16 (the official default precision) under the official names, next to the fixed token buffers and, for MaPLe
and PromptSRC (which register the whole model), the frozen CLIP weights, PromptSRC's zero-shot image tower too.

Each file is evaluated through the method's own --load path (main(), --eval-only) and compared with the same
tensors put straight into the model: the logits the evaluation computes must be identical (torch.equal).
"""
import collections
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

import clip
import data
import eval as evaluation
from conftest import EUROSAT_CLASSES
from test_coop import COMMON, load_method

pytestmark = pytest.mark.filterwarnings("ignore:--prompt-depth.* exceeds", "ignore:--prompt-depth .* exceeds")
BASE = EUROSAT_CLASSES[:5]  # the tiny EuroSAT's base classes, those the official trainer trains on


class WarmupScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Dassl's constant warm-up: `cons_lr` for `warmup_epoch` epochs, then its successor's schedule. Its state dict
    (what Dassl saves) is its __dict__ without the optimizer, so it holds the successor object."""

    def __init__(self, optimizer, successor, warmup_epoch: int, cons_lr: float):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch < self.warmup_epoch:
            return [self.cons_lr for _ in self.base_lrs]
        return self.successor.get_last_lr()

    def step(self):
        if self.last_epoch < self.warmup_epoch:
            super().step()
        else:
            self.successor.step()
            self.last_epoch += 1
            self._last_lr = self.successor.get_last_lr()


def train_like_the_official_trainer(model, params, epochs: int = 3):
    """SGD with momentum over `params` under the warm-up + cosine schedule, one real step per epoch on random
    images; returns (optimizer, scheduler) in their state after training."""
    optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
    scheduler = WarmupScheduler(optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(epochs)),
                                warmup_epoch=1, cons_lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        images = torch.randn(4, 3, 32, 32, generator=generator)
        loss = F.cross_entropy(model(model.image_features(images)), torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def frozen_clip(clip_model) -> dict:
    """The frozen CLIP weights under the names of the official CustomCLIP (image_encoder, text_encoder, logit_scale)."""
    text = ("transformer.", "positional_embedding", "ln_final.", "text_projection")
    out = {}
    for key, value in clip_model.state_dict().items():
        if key.startswith("visual."):
            out["image_encoder." + key[len("visual."):]] = value
        elif key.startswith(text):
            out["text_encoder." + key] = value
        elif key == "logit_scale":
            out[key] = value
    return out


def official_state(method: str, learned: dict, clip_model, n_ctx: int) -> tuple[str, dict]:
    """(the name the official trainer registers its model under, the state dict it saves), holding `learned`
    (our names, fp16) under the official names with the official extras."""
    g = torch.Generator().manual_seed(1)
    C, D, L = len(BASE), clip_model.ln_final.weight.shape[0], clip_model.context_length

    def noise(*shape):  # fixed buffers and unused weights: any values, the loader must ignore them
        return torch.randn(*shape, generator=g).half()

    tokens = {"token_prefix": noise(C, 1, D), "token_suffix": noise(C, L - 1 - n_ctx, D)}
    if method in ("coop", "cocoop", "prograd"):
        return "prompt_learner", {**learned, **tokens}
    if method == "kgcoop":  # the official prompt learner also registers these, never trained or used
        return "prompt_learner", {**learned, "bias_vectors": noise(1, 512), "meta_net.linear1.weight": noise(512, 512),
                                  "meta_net.linear1.bias": noise(512), **tokens}
    if method == "proda":
        return "prompt_learner", {**learned, **tokens, "nc_token_prefix": noise(1, 1, D),
                                  "nc_token_suffix": noise(1, L - 1 - n_ctx, D)}
    frozen = frozen_clip(clip_model)
    if method == "maple":  # the whole model is registered
        return "MultiModalPromptLearner", {**{"prompt_learner." + k: v for k, v in {**learned, **tokens}.items()},
                                           **frozen}
    assert method == "promptsrc"
    state = {**frozen, "prompt_learner.ctx": learned["ctx"], "image_encoder.VPT": learned["VPT"],
             **{"prompt_learner." + k: v for k, v in tokens.items()},
             **{"prompt_learner.ZS_image_encoder." + k[len("image_encoder."):]: v
                for k, v in frozen.items() if k.startswith("image_encoder.")}}
    for key, value in learned.items():
        tower, _, block = key.partition("_VPT_shallow.")
        if block:
            state[f"{tower}_encoder.transformer.resblocks.{block}.VPT_shallow"] = value
    return "VLPromptLearner", state


def save_official(path, state: dict, optimizer, scheduler, epoch: int) -> None:
    """Dassl's save_model: the layout, an OrderedDict state dict, torch.save's default pickling."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": collections.OrderedDict(state), "epoch": epoch, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "val_result": None}, path)


def evaluation_logits(monkeypatch, module, argv: list[str]) -> dict:
    """Run module.main(argv) and return {split: logits} that its evaluation computes, through its own encode_fn
    and logits_fn, for fixed random images against the base and the novel classes; the rest of the evaluation
    is skipped."""
    seen = {}

    def capture(train, targets, *, encode_fn, logits_fn, dataset, **kwargs):
        images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            features = encode_fn(images)
            for name in ("base", "novel"):
                seen[name] = logits_fn(features, tuple(targets[name].classnames), dataset).detach().clone()
        return {}, 1.0

    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "evaluate_protocol", capture)
        module.main(argv)
    return seen


METHODS = {  # method -> (its options for the official recipe on the tiny CLIP, the module it registers)
    "coop": ([], "prompt_learner"), "cocoop": ([], "prompt_learner"), "kgcoop": ([], "prompt_learner"),
    "prograd": ([], "prompt_learner"), "proda": ([], "prompt_learner"),
    "maple": (["--ctx-init", "a photo of a"], "model"), "promptsrc": ([], "model"),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_official_checkpoint_after_training_loads_safely_and_gives_the_logits_of_its_tensors(
        method, tiny_world, tmp_path, monkeypatch):
    root, ckpt, cache = tiny_world
    monkeypatch.setenv("CP_CACHE", str(cache))
    module = load_method(method)
    options, registered = METHODS[method]
    clip_model, _ = clip.load(str(ckpt), device="cpu")
    torch.manual_seed(5)
    model = module.CustomCLIP(module.parse_args(options), BASE, clip_model)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("prompt_learner."))
    untrained = {k: v.clone() for k, v in model.prompt_learner.state_dict().items()}
    # Dassl's build_optimizer takes every parameter of the registered module, frozen ones included.
    optimizer, scheduler = train_like_the_official_trainer(
        model, list((model.prompt_learner if registered == "prompt_learner" else model).parameters()))
    assert isinstance(optimizer.state, collections.defaultdict) and len(optimizer.state) > 0
    assert all(isinstance(p, torch.nn.Parameter) and "momentum_buffer" in s for p, s in optimizer.state.items())
    learned = {k: v.detach().half() for k, v in model.prompt_learner.state_dict().items()}
    for key, value in learned.items():  # every learned tensor moved: a tensor left unloaded would show
        assert not torch.equal(value, untrained[key].half()), key
    name, state = official_state(method, learned, clip_model, model.prompt_learner.n_ctx)
    path = tmp_path / "official" / name / "model.pth.tar-3"
    save_official(path, state, optimizer, scheduler, epoch=3)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # the pickled scheduler and optimizer: not a weights-only file

    argv = [*COMMON, "--root", str(root), "--backbone", str(ckpt), "--eval-only", "--load", str(path), *options]
    text_calls, text_features = [], evaluation.text_features
    monkeypatch.setattr(evaluation, "text_features", lambda *a, **k: text_calls.append(a[1][:1]) or text_features(*a, **k))
    through_load = evaluation_logits(monkeypatch, module, [*argv, "--output", str(tmp_path / "loaded")])
    # Evaluation only (its own text features are skipped here): no training target (zero-shot W0, KgCoOp's w0,
    # ProGrad's teacher, PromptSRC's ensemble) is computed.
    assert text_calls == []
    monkeypatch.setattr(evaluation, "text_features", text_features)

    # The same tensors straight into the model: no reader, no renaming, a strict load_state_dict.
    monkeypatch.setattr(evaluation, "read_checkpoint", lambda path, allow_pickle=False: dict(learned))
    monkeypatch.setattr(evaluation, "load_prompt_state",
                        lambda module, state, path: module.load_state_dict(state, strict=True))
    direct = evaluation_logits(monkeypatch, module, [*argv, "--output", str(tmp_path / "direct")])
    for split in ("base", "novel"):
        assert through_load[split].shape == (6, 5)
        assert torch.equal(through_load[split], direct[split]), split


# ------------------------------------------------------------------------------ foreign pickled objects
class Planted:
    """Unpickling this calls `call(*args)`: each payload would create the file `marker`."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def payloads(marker):
    return {"os.system": Planted(os.system, f"touch '{marker}'"), "open": Planted(open, str(marker), "w"),
            "exec": Planted(exec, f"open({str(marker)!r}, 'w').close()")}


@pytest.mark.parametrize("payload", ["os.system", "open", "exec"])
def test_a_pickled_foreign_callable_executes_nothing(payload, tmp_path):
    """A foreign callable anywhere in an official-layout file (next to the scheduler, inside a defaultdict, as
    BUILD state) is never called: the tensors come out and the file it would create does not exist. The same
    file read with allow_pickle=True does create it, so the payload is real."""
    marker = tmp_path / "ran"
    ctx = torch.randn(4, 8)
    params = [torch.nn.Parameter(ctx.clone())]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    params[0].grad = torch.ones_like(ctx)
    optimizer.step()
    scheduler = WarmupScheduler(optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 2.0), 1, 1e-5)
    planted = payloads(marker)[payload]
    scheduler.successor.planted = planted  # pickled as part of the successor's state (BUILD)
    nested = collections.defaultdict(list, {"a": [planted]})
    path = tmp_path / "prompt_learner" / "model.pth.tar-2"
    path.parent.mkdir()
    torch.save({"state_dict": collections.OrderedDict(ctx=ctx), "epoch": 2, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "val_result": planted, "extra": nested}, path)

    tensors = evaluation.read_checkpoint(path)
    assert set(tensors) == {"ctx"} and torch.equal(tensors["ctx"], ctx)
    assert not marker.exists()
    evaluation.read_checkpoint(path, allow_pickle=True)  # the full unpickler runs the payload
    assert marker.exists()


def test_checkpoint_problems_are_user_errors(tmp_path):
    with pytest.raises(data.UserError, match="does not exist.*--load"):
        evaluation.read_checkpoint(tmp_path / "missing.pth.tar")
    (tmp_path / "junk").write_bytes(b"not a checkpoint")
    with pytest.raises(data.UserError, match="cannot read the checkpoint"):
        evaluation.read_checkpoint(tmp_path / "junk")
    torch.save({"state_dict": {"epoch": 3}}, tmp_path / "empty")
    with pytest.raises(data.UserError, match="holds no tensors"):
        evaluation.read_checkpoint(tmp_path / "empty")
    module = torch.nn.Linear(2, 3)
    with pytest.raises(data.UserError, match=r"does not fit this model: missing \['bias'\].*--n-ctx"):
        evaluation.load_prompt_state(module, {"weight": torch.zeros(3, 2)}, "file")
