"""PromptSRC: Self-regulating Prompts (Khattak et al., ICCV 2023), https://arxiv.org/abs/2307.06948

PromptSRC prompts both CLIP encoders, independently, and keeps the prompted model close to frozen CLIP.
Relative to CoOp: besides the text context `ctx` (4 vectors, "a photo of a"), 4 learnable vision tokens `VPT`
are appended after the image patch tokens (before ln_pre); before text block i = 1..depth-1 new text prompts
replace the tokens at positions 1..n_ctx, and before vision block i new vision prompts replace the appended
tokens (the official `VPT_shallow` of block i). Image features now depend on the prompts: training runs the
prompted image encoder every step, evaluation encodes each test image once per split with the final prompts.
The loss adds three self-regulating terms to the cross-entropy: 25 * mean L1 of the tuned class text features
to the frozen template-ensemble features (--ensemble-templates), 10 * mean L1 of the prompted image features to frozen CLIP's
features of the same images, and KL(zero-shot || tuned) of the logits (sum / (B*C)), the zero-shot teacher
being frozen image features against the ensemble text features. Gaussian prompt aggregation (GPA): after
epoch e = 1..E the learned tensors are accumulated with weight N(e; mean, std) (normalised to sum 1); the
aggregate is what is evaluated and saved.

With --calib ours the loss gains the two regularizers of "Towards Calibrating Prompt Tuning of
Vision-Language Models" (CVPR 2026): the mean-variance margin penalty on the training logits and text
moment matching to frozen zero-shot text features (losses.py); other values select the baselines.

Example:
    python methods/promptsrc.py --dataset oxford_pets --root data --seed 1 --calib ours

Recipes. Both share: text context from "a photo of a", 4 vision tokens and all deep prompts N(0, 0.02), depth 9
on both sides, loss weights 25 / 10, batch 4, SGD lr 0.0025 (momentum 0.9, weight decay 5e-4), one warm-up
epoch at 1e-5, then a per-epoch cosine schedule.
- DAC's ViT-B/16 setting (Wang et al., ICML 2024), the defaults: the 80 CLIP ImageNet templates for the text
  ensemble, 50 epochs, GPA mean 30 std 30:
      python methods/promptsrc.py --dataset oxford_pets --root data --seed 1
- The original PromptSRC setting (Khattak et al.): the official code's 60 of those templates, 20 epochs,
  GPA mean 15 std 1:
      python methods/promptsrc.py --dataset oxford_pets --root data --seed 1 --ensemble-templates promptsrc60 --epochs 20 --gpa-mean 15 --gpa-std 1
The choice is recorded with the other options in results.json ("args").

Deviations from the official code:
- Prompts train in fp32; only the frozen encoders run in fp16/bf16 under autocast, and prompts enter them in
  the activations' dtype. The official code casts every prompt (and the teacher logits) to fp16 even in
  "fp32" mode, where it fails as released. The ensemble text features are computed in fp32, as there.
- GPA averages only the learned tensors, in fp32; the official code averages the whole state dict in fp16.
  The frozen weights are equal in every epoch, so the model is the same, without the fp16 drift.
- CLIP is unchanged: the deep prompts are inserted by looping over its residual blocks here, and the prompted
  vision forward is written here from the ViT's parts (the official code forks clip/model.py). Frozen CLIP's
  image features come from the same encoder run without prompts, not from a second copy of it.
- Widths and layer counts come from the loaded model, so any ViT works; a depth beyond a tower's layers is
  clipped with a warning; ResNet backbones have no tokens to prompt and are refused.
- The text context has as many vectors as the phrase has tokens (--n-ctx only sizes a random init); the
  official code takes the first n_ctx tokens of the phrase but keeps the whole phrase in the prompt.
- By default the ensemble is the 80 CLIP ImageNet templates (DAC's copy); the official code averages 60 of
  them (--ensemble-templates promptsrc60, data.PROMPTSRC_TEMPLATES, in the official order).
- No --feature-cache (image features depend on the prompts). With --calib zs_norm/penalty the frozen
  zero-shot logits are frozen image features against the dataset template (CoOp column).
- The checkpoint holds only the learned tensors: `ctx`, `VPT`, `text_VPT_shallow.<i>`, `image_VPT_shallow.<i>`
  (i = the block the prompt enters). Official checkpoints (the whole model's state dict under "state_dict")
  load too: their prompt tensors are renamed, the frozen CLIP weights in them are ignored.
- Prompts are cut after the last end-of-text token of the class list (clip.trim) instead of running all
  77 positions: the causal text transformer never attends past EOT, so the features agree to float rounding
  (about 1e-6) at a fraction of the cost (about a quarter for a 20-token prompt).
- Training augmentation (RandomResizedCrop, horizontal flip) runs on the training device on images decoded
  once (data.TrainImages), drawn from a generator seeded with --seed, with torch's antialiased bicubic resize
  in place of PIL's: the pixels differ by under a hundredth of a grey level on average (README).
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import random
import re
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import clip  # noqa: E402
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import losses  # noqa: E402
from clip.model import VisionTransformer  # noqa: E402

METHOD = "promptsrc"
# --ensemble-templates: the templates whose frozen text features are averaged into PromptSRC's text target.
ENSEMBLES = {"imagenet80": data.IMAGENET_TEMPLATES, "promptsrc60": data.PROMPTSRC_TEMPLATES}


def parse_args(argv=None) -> argparse.Namespace:
    p = evaluation.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="oxford_pets", help="dataset key (see data.DATASETS); the source for --protocol xd")
    p.add_argument("--root", default=os.environ.get("DATA", "data"), help="folder holding the datasets (README 'Datasets')")
    p.add_argument("--protocol", default="base2new", choices=data.PROTOCOLS,
                   help="base2new: train on base classes, test base and novel; xd: train on all ImageNet classes, "
                        "test on its variants and the other datasets")
    p.add_argument("--seed", type=evaluation.at_least(0), default=1, help="seeds the few-shot draw and the training")
    p.add_argument("--shots", type=evaluation.at_least(1), default=16, help="training images per class")
    p.add_argument("--backbone", default="ViT-B/16", help="CLIP model name or checkpoint path")
    p.add_argument("--output", default="output", help="results go to OUTPUT/PROTOCOL/METHOD/CALIB/DATASET/seedN/")
    p.add_argument("--epochs", type=evaluation.at_least(1), default=50, help="training epochs (the first is the warm-up epoch)")
    p.add_argument("--batch-size", type=evaluation.at_least(1), default=4, help="training batch size")
    p.add_argument("--lr", type=float, default=0.0025, help="peak learning rate of the cosine schedule")
    p.add_argument("--warmup-lr", type=float, default=1e-5, help="constant learning rate of the first epoch")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (applied to the prompts too)")
    p.add_argument("--n-ctx", type=evaluation.at_least(1), default=4, help="number of text context vectors (ignored with --ctx-init)")
    p.add_argument("--ctx-init", default="a photo of a",
                   help='initialise the text context from this phrase; "" = --n-ctx random N(0, 0.02) vectors')
    p.add_argument("--n-ctx-vision", type=evaluation.at_least(1), default=4, help="number of vision prompt tokens at every depth")
    p.add_argument("--prompt-depth-text", type=evaluation.at_least(1), default=9,
                   help="text layers that get prompts: 1 = the input only, 9 = the input and layers 1..8 "
                        "(clipped to the model's layers)")
    p.add_argument("--prompt-depth-vision", type=evaluation.at_least(1), default=9,
                   help="vision layers that get prompts: 1 = the input only, 9 = the input and layers 1..8 "
                        "(clipped to the model's layers)")
    p.add_argument("--text-loss-weight", type=float, default=25.0,
                   help="weight of the L1 distance of the tuned text features to the template-ensemble features")
    p.add_argument("--image-loss-weight", type=float, default=10.0,
                   help="weight of the L1 distance of the prompted image features to frozen CLIP's")
    p.add_argument("--ensemble-templates", default="imagenet80", choices=sorted(ENSEMBLES),
                   help="templates averaged into the frozen text target: imagenet80 = the 80 CLIP ImageNet "
                        "templates (DAC's setting), promptsrc60 = the 60 of them the original PromptSRC uses")
    p.add_argument("--gpa-mean", type=float, default=30.0,
                   help="mean (in epochs, 1-based) of the Gaussian prompt aggregation weights (original: 15; "
                        "DAC's config notes 45 with std 5 for StanfordCars, Flowers102, FGVCAircraft, DTD, EuroSAT)")
    p.add_argument("--gpa-std", type=float, default=30.0,
                   help="standard deviation (in epochs) of the Gaussian prompt aggregation weights (original: 1)")
    p.add_argument("--save-epoch-prompts", action="store_true",
                   help="also save each epoch's learned tensors (before aggregation) as epochs/prompt_epoch<N>.pt, "
                        "e.g. to re-weight the aggregation later")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--precision", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="autocast dtype of the frozen encoders; auto = fp16 on CUDA, fp32 elsewhere")
    p.add_argument("--workers", type=evaluation.at_least(0), default=None,
                   help="processes decoding evaluation images, threads decoding training images "
                        "(unset: min(8, CPUs) on CUDA, 0 elsewhere)")
    p.add_argument("--image-cache-gb", type=float, default=2.0,
                   help="decoded training images up to this size are kept on the training device, more in "
                        "host memory (augmentation runs on the device every step)")
    p.add_argument("--checkpoint-text", action="store_true",
                   help="activation checkpointing in the text encoder: far less memory for many classes, "
                        "same gradients, about a third more text-side compute")
    p.add_argument("--eval-only", action="store_true", help="skip training and evaluate the prompt given by --load")
    p.add_argument("--load", default=None, help="prompt checkpoint to evaluate (ours, or the official PromptSRC's)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow --load to unpickle arbitrary objects (only for files you trust)")
    losses.add_calibration_args(p)
    args = p.parse_args(argv)
    if args.eval_only and not args.load:
        p.error("--eval-only needs --load, the prompt checkpoint to evaluate")
    return args


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """Gaussian prompt aggregation weights of epochs 1..E: the normal density N(e; mean, std), normalised to sum 1."""
    if epochs < 1 or std <= 0:
        raise data.UserError(f"Gaussian prompt aggregation needs --epochs >= 1 and --gpa-std > 0 "
                             f"(got {epochs}, {std})")
    e = np.arange(1, epochs + 1, dtype=np.float64)
    density = np.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    if not density.sum() > 0:  # every epoch is too many standard deviations away from the mean
        raise data.UserError(f"--gpa-mean {mean} --gpa-std {std} give every epoch 1..{epochs} zero weight")
    return (density / density.sum()).tolist()


def clipped_depth(depth: int, layers: int, tower: str) -> int:
    """A prompt depth within 1..layers: deeper than the tower is clipped with a warning, below 1 is an error."""
    if depth < 1:
        raise data.UserError(f"--prompt-depth-{tower} must be at least 1 (the input prompts), got {depth}")
    if depth > layers:
        warnings.warn(f"--prompt-depth-{tower} {depth} exceeds the {layers} layers of the {tower} encoder; "
                      f"clipped to {layers}", stacklevel=2)
    return min(depth, layers)


class TextEncoder(nn.Module):
    """CLIP's text transformer run on prompt embeddings, with deep prompts replacing the context tokens."""

    def __init__(self, clip_model, checkpoint_blocks: bool = False):
        super().__init__()
        self.checkpoint_blocks = checkpoint_blocks
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.dtype = clip_model.dtype

    def forward(self, prompts: torch.Tensor, tokenized_prompts: torch.Tensor, deep_prompts=None) -> torch.Tensor:
        """deep_prompts[str(i)] (n_ctx, D) replaces the hidden states at positions 1..n_ctx before block i."""
        deep_prompts = deep_prompts or {}
        # Prompts are cut after their last end-of-text token (clip.trim), so L can be shorter than the context.
        x = prompts.type(self.dtype) + self.positional_embedding[: prompts.shape[1]].type(self.dtype)  # (C, L, D)
        x = x.permute(1, 0, 2)  # NLD -> LND
        for i, block in enumerate(self.transformer.resblocks):
            if str(i) in deep_prompts:
                ctx = deep_prompts[str(i)].type(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)  # (n_ctx, C, D)
                x = torch.cat([x[:1], ctx, x[1 + ctx.shape[0]:]], dim=0)  # (L, C, D): SOS, new prompts, the rest
            # With --checkpoint-text only each block's input is kept; its activations are recomputed in backward.
            x = checkpoint(block, x, use_reentrant=False) if self.checkpoint_blocks and x.requires_grad else block(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_final(x).type(self.dtype)
        # The feature is read at the end-of-text token, which has the largest id in every prompt.
        return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ self.text_projection  # (C, E)


class VLPromptLearner(nn.Module):
    """Independent text and vision prompts: the text context vectors `ctx` between SOS and "{class}." and the
    vision tokens `VPT` appended to the patch tokens enter the first layer; `text_VPT_shallow[i]` and
    `image_VPT_shallow[i]` replace them before block i = 1..depth-1 of their tower."""

    def __init__(self, args, classnames: list[str], clip_model):
        super().__init__()
        if not isinstance(clip_model.visual, VisionTransformer):
            raise data.UserError(f"PromptSRC prompts the tokens of a ViT image encoder; --backbone {args.backbone} "
                                 f"is a ResNet ({type(clip_model.visual).__name__}); use a ViT such as ViT-B/16")
        ctx_dim = clip_model.ln_final.weight.shape[0]
        vis_dim = clip_model.visual.conv1.weight.shape[0]
        depth_text = clipped_depth(args.prompt_depth_text, len(clip_model.transformer.resblocks), "text")
        depth_vision = clipped_depth(args.prompt_depth_vision, len(clip_model.visual.transformer.resblocks), "vision")
        if args.ctx_init:
            ctx_init = args.ctx_init.replace("_", " ")
            tokens = clip.tokenize(ctx_init, context_length=clip_model.context_length)[0]  # (L,)
            n_ctx = int((tokens > 0).sum()) - 2  # BPE tokens between SOS and EOT
            with torch.no_grad():
                embedding = clip_model.token_embedding(tokens.to(clip_model.positional_embedding.device))  # (L, D)
            ctx_vectors = embedding[1:1 + n_ctx].float()  # (n_ctx, D)
            prompt_prefix = ctx_init
        else:
            n_ctx = args.n_ctx
            ctx_vectors = torch.empty(n_ctx, ctx_dim)
            nn.init.normal_(ctx_vectors, std=0.02)
            prompt_prefix = " ".join(["X"] * n_ctx)
        self.ctx = nn.Parameter(ctx_vectors.to(clip_model.positional_embedding.device))  # (n_ctx, D), fp32

        def normal(n: int, dim: int) -> nn.Parameter:
            return nn.Parameter(nn.init.normal_(torch.empty(n, dim, device=self.ctx.device), std=0.02))  # (n, dim), fp32

        self.VPT = normal(args.n_ctx_vision, vis_dim)  # (n_v, D_img)
        # Keyed by the block the prompt enters (1..depth-1), the index of the official resblocks.<i>.VPT_shallow.
        self.text_VPT_shallow = nn.ParameterDict({str(i): normal(n_ctx, ctx_dim) for i in range(1, depth_text)})
        self.image_VPT_shallow = nn.ParameterDict({str(i): normal(args.n_ctx_vision, vis_dim)
                                                   for i in range(1, depth_vision)})
        self.n_ctx, self.prompt_prefix = n_ctx, prompt_prefix
        self.set_classnames(classnames, clip_model)

    @torch.no_grad()
    def set_classnames(self, classnames: list[str], clip_model) -> None:
        """Rebuild the fixed token buffers for a class list (base classes for training, any list for testing)."""
        prompts = [f"{self.prompt_prefix} {data.clean_classname(name)}." for name in classnames]
        tokenized = clip.tokenize(prompts, context_length=clip_model.context_length)  # (C, context_length)
        # Cut after the last EOT: the causal text transformer never looks past it, so the padding is wasted work.
        tokenized = clip.trim(tokenized).to(self.ctx.device)  # (C, L)
        embedding = clip_model.token_embedding(tokenized).type(clip_model.dtype)  # (C, L, D)
        # Not persistent: a checkpoint holds only the learned tensors; these are rebuilt from the names.
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)  # (C, 1, D) SOS
        self.register_buffer("token_suffix", embedding[:, 1 + self.n_ctx:], persistent=False)  # (C, L-1-n_ctx, D)
        self.tokenized_prompts = tokenized
        self.n_cls = len(classnames)

    def forward(self) -> torch.Tensor:
        ctx = self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1)  # (C, n_ctx, D)
        return torch.cat([self.token_prefix.type(ctx.dtype), ctx, self.token_suffix.type(ctx.dtype)], dim=1)  # (C, L, D)


_OFFICIAL_DEEP = re.compile(r"(text|image)_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow")


def from_official(state: dict) -> dict:
    """Our names for the prompt tensors of an official PromptSRC checkpoint (the whole CustomCLIP state dict:
    prompt_learner.ctx, image_encoder.VPT, {text,image}_encoder.transformer.resblocks.<i>.VPT_shallow and the
    frozen CLIP weights, which are dropped). Our own checkpoints are returned unchanged."""
    if "prompt_learner.ctx" not in state:
        return state
    ours = {"ctx": state["prompt_learner.ctx"]}
    if "image_encoder.VPT" in state:
        ours["VPT"] = state["image_encoder.VPT"]
    for key, value in state.items():
        match = _OFFICIAL_DEEP.fullmatch(key)
        if match:
            ours[f"{match[1]}_VPT_shallow.{match[2]}"] = value
    return ours


class CustomCLIP(nn.Module):
    def __init__(self, args, classnames: list[str], clip_model):
        super().__init__()
        self.prompt_learner = VLPromptLearner(args, classnames, clip_model)
        self.image_encoder = clip_model.visual
        self.text_encoder = TextEncoder(clip_model, args.checkpoint_text)
        self.logit_scale = clip_model.logit_scale
        self.dtype = clip_model.dtype

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Prompted image features (B, E), normalised: the ViT's forward with the vision prompts appended."""
        visual, pl = self.image_encoder, self.prompt_learner
        x = visual.embed(images.type(self.dtype))  # (B, 1 + grid**2, W): class token, patches, positions
        n_v = pl.VPT.shape[0]
        x = torch.cat([x, pl.VPT.type(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)  # (B, N + n_v, W)
        x = visual.ln_pre(x).permute(1, 0, 2)  # NLD -> LND
        for i, block in enumerate(visual.transformer.resblocks):
            if str(i) in pl.image_VPT_shallow:  # replace the previous layer's prompt outputs by this layer's prompts
                ctx = pl.image_VPT_shallow[str(i)].type(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)  # (n_v,B,W)
                x = torch.cat([x[:-n_v], ctx], dim=0)  # (N + n_v, B, W)
            x = block(x)
        x = visual.ln_post(x[0]) @ visual.proj  # class token: (B, E)
        return F.normalize(x.float(), dim=-1)

    def zero_shot_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen CLIP's image features (B, E), normalised: the same encoder without prompts."""
        return F.normalize(self.image_encoder(images.type(self.dtype)).float(), dim=-1)

    def text_features(self) -> torch.Tensor:
        prompts = self.prompt_learner()  # (C, L, D)
        pl = self.prompt_learner
        return F.normalize(self.text_encoder(prompts, pl.tokenized_prompts, pl.text_VPT_shallow).float(), dim=-1)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) from normalised prompted image features (B, E): evaluation encodes each test image
        once and passes the features in."""
        return self.logit_scale.exp().float() * image_features @ self.text_features().t()


@torch.no_grad()
def ensemble_text_features(clip_model, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """w_ens (C, E): frozen CLIP's text features, unnormalised and in fp32, averaged over the templates, then
    normalised (PromptSRC's text target, computed once)."""
    prompts = [t.format(data.clean_classname(name)) for t in templates for name in classnames]  # T*C, template-major
    feats = evaluation.text_features(clip_model, prompts, fp32=True, normalize=False)  # (T*C, E)
    return F.normalize(feats.view(len(templates), len(classnames), -1).mean(dim=0), dim=-1)  # (C, E)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    gpa_weight = None if args.eval_only else gpa_weights(args.epochs, args.gpa_mean, args.gpa_std)  # checked early
    device, amp_dtype = evaluation.pick_device(args.device, args.precision)
    amp = dict(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # the frozen encoders' autocast
    run_dir = evaluation.run_dir(args, METHOD)

    # Data: the few-shot training split and the test splits of the protocol (all checked before training).
    train, targets = data.protocol_splits(args.protocol, args.dataset, args.root, args.shots, args.seed)
    clip_model = evaluation.load_backbone(args.backbone, device, amp_dtype)
    n_px = clip_model.visual.input_resolution
    print(f"{METHOD} on {args.dataset} ({args.protocol}): {len(train.classnames)} training classes, "
          f"{len(train.train)} training images, device {device}, precision {amp_dtype or torch.float32}")

    # Model: only the prompt learner trains.
    model = CustomCLIP(args, train.classnames, clip_model).to(device)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("prompt_learner."))
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    print(f"trainable: {', '.join(trainable)} ({sum(trainable.values())} values)")
    logit_scale = model.logit_scale.exp().float()  # CLIP's frozen logit scale, a 0-dim fp32 tensor
    if args.load:
        state = evaluation.read_checkpoint(args.load, allow_pickle=args.allow_pickle)
        state = {k: v for k, v in from_official(state).items()
                 if k not in ("token_prefix", "token_suffix")}  # rebuilt, not loaded
        evaluation.load_prompt_state(model.prompt_learner, state, args.load)

    train_time = 0.0
    if not args.eval_only:
        # Frozen zero-shot text features W0 of the training classes (CoOp template), computed once.
        zs_text = evaluation.text_features(clip_model, data.prompts(args.dataset, train.classnames, "coop"))  # (C, E)
        t0 = time.time()  # training time includes decoding the images
        # PromptSRC's text target: the template-ensemble features of the training classes, computed once.
        ens_text = ensemble_text_features(clip_model, train.classnames, ENSEMBLES[args.ensemble_templates])  # (C, E)
        # Decoded once; each batch is cropped, flipped, resized and normalised on the device (data.TrainImages).
        loader = data.TrainImages(train.train, n_px, args.batch_size, device, args.seed, train.min_crop,
                                  int(args.image_cache_gb * 2**30), args.workers)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        # Gaussian prompt aggregation: running sum over epochs of weight * learned tensors, fp32.
        aggregate = {name: torch.zeros_like(p) for name, p in model.prompt_learner.named_parameters()}
        peak = int(np.argmax(gpa_weight))
        print(f"Gaussian prompt aggregation (mean {args.gpa_mean}, std {args.gpa_std}): epoch weights "
              f"{gpa_weight[0]:.4f} (first), {gpa_weight[peak]:.4f} (epoch {peak + 1}, largest), "
              f"{gpa_weight[-1]:.4f} (last)")
        for epoch in range(args.epochs):
            lr = args.warmup_lr if epoch == 0 else 0.5 * args.lr * (1 + math.cos(math.pi * (epoch - 1) / args.epochs))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            seen = 0
            for batch, labels in loader:
                with torch.autocast(**amp):
                    with torch.no_grad():  # frozen CLIP on the same augmented images: the image target
                        zs_image_features = model.zero_shot_image_features(batch)  # (B, E)
                    image_features = model.image_features(batch)  # (B, E), prompted
                    text_features = model.text_features()  # (C, E)
                logits = logit_scale * image_features @ text_features.t()  # (B, C), fp32
                # PromptSRC's zero-shot teacher: frozen image features against the ensemble text features.
                ens_logits = logit_scale * zs_image_features @ ens_text.t()  # (B, C)
                zs_logits = logit_scale * zs_image_features @ zs_text.t() \
                    if losses.needs_zs_logits(args.calib) else None  # (B, C)
                # CE + L1(text, ensemble) + L1(image, frozen image) + KL(teacher || tuned) summed over B*C
                # entries and divided by B*C (the official reduction) + the calibration term.
                loss = (F.cross_entropy(logits, labels)
                        + args.text_loss_weight * F.l1_loss(text_features, ens_text)
                        + args.image_loss_weight * F.l1_loss(image_features, zs_image_features)
                        + F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(ens_logits, dim=1), reduction="sum",
                                   log_target=True) / logits.numel()
                        + losses.calibration(args.calib, logits, labels, text_features, zs_text, zs_logits,
                                             **losses.calibration_kwargs(args)))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(labels)
                correct += (logits.argmax(dim=1) == labels).sum()
                seen += len(labels)
            epoch_loss, epoch_acc = (loss_sum / seen).item(), (100 * correct / seen).item()  # one sync per epoch
            if not math.isfinite(epoch_loss):
                raise data.UserError(f"the training loss became {epoch_loss} in epoch {epoch + 1}; stopping "
                                     f"without writing results (try --precision fp32 or a lower --lr)")
            print(f"epoch {epoch + 1:>3}/{args.epochs}  lr {lr:.2e}  loss {epoch_loss:.4f}  "
                  f"train acc {epoch_acc:6.2f}  {time.time() - t0:7.1f}s", flush=True)
            with torch.no_grad():
                for name, p in model.prompt_learner.named_parameters():
                    aggregate[name] += gpa_weight[epoch] * p
            if args.save_epoch_prompts:
                (run_dir / "epochs").mkdir(exist_ok=True)
                evaluation.save_prompt(model.prompt_learner.state_dict(),
                                       run_dir / "epochs" / f"prompt_epoch{epoch + 1}.pt")
        train_time = time.time() - t0
        model.prompt_learner.load_state_dict(aggregate)  # the aggregated prompts are evaluated and saved
        evaluation.save_prompt(model.prompt_learner.state_dict(), run_dir / "prompt.pt")

    # Evaluation: each test image goes through the prompted image encoder once per split; raw, TS and DAC
    # come from the same features.
    model.eval()

    @functools.lru_cache(maxsize=None)  # evaluation asks for each class list's features more than once
    def tuned_text_fn(classnames: tuple[str, ...], key: str) -> torch.Tensor:
        model.prompt_learner.set_classnames(classnames, clip_model)
        with torch.autocast(**amp):
            return model.text_features()  # (C, E), fp32

    def logits_fn(features: torch.Tensor, classnames: tuple[str, ...], key: str) -> torch.Tensor:
        # The product runs outside autocast, so evaluation logits are fp32 like the training logits.
        return logit_scale * features.to(device) @ tuned_text_fn(classnames, key).t()  # (N, C)

    t0 = time.time()
    metrics, temperature = evaluation.evaluate_protocol(
        train, targets, encode_fn=model.image_features, logits_fn=logits_fn, tuned_text_fn=tuned_text_fn,
        clip_model=clip_model, dataset=args.dataset, n_px=n_px, device=device, amp_dtype=amp_dtype,
        out_dir=run_dir, num_workers=args.workers)
    timings = {"train_s": train_time, "eval_s": time.time() - t0, "total_s": time.time() - started}
    evaluation.write_results(run_dir, method=METHOD, args=args, metrics=metrics, temperature=temperature,
                             timings=timings)


if __name__ == "__main__":
    with evaluation.user_errors():
        main()
