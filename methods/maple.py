"""MaPLe: Multi-modal Prompt Learning (Khattak et al., CVPR 2023), https://arxiv.org/abs/2210.03117

MaPLe prompts both CLIP encoders at once. Relative to CoOp: only n_ctx = 2 text context vectors sit after
SOS, and each is also mapped to the vision side by a linear layer `proj` (D_txt -> D_img), whose output is
appended as extra tokens after the image patch tokens (before ln_pre). Deeper, for the text layers 1..depth-1,
new text prompts `compound_prompts_text` (n_ctx x D_txt each) replace the tokens at positions 1..n_ctx,
and each is mapped by its own linear layer `compound_prompt_projections[i]` to the vision prompts that
replace the appended tokens before vision layer i+1. The vision prompts are functions of the text prompts
("coupling"), so the image features depend on the learned parameters: training runs the prompted image
encoder every step and evaluation encodes each test image once per split with the trained prompts.

With --calib ours the loss gains the two regularizers of "Towards Calibrating Prompt Tuning of
Vision-Language Models" (CVPR 2026): the mean-variance margin penalty on the training logits and text
moment matching to frozen zero-shot text features (losses.py); other values select the baselines.

Example:
    python methods/maple.py --dataset oxford_pets --root data --seed 1 --calib ours

Recipe (defaults): DAC's ViT-B/16 setting, 2 random N(0, 0.02) context vectors (--ctx-init "a photo of a"
gives the original MaPLe initialisation, its first 2 tokens learnable), prompt depth 9, 5 epochs, batch 4,
SGD lr 0.0035 (momentum 0.9, weight decay 5e-4), one warm-up epoch at 1e-5, then a per-epoch cosine
schedule (DAC's setting, Wang et al., ICML 2024).

Deviations from the official code:
- --ctx-init works for any --n-ctx up to the phrase's length in tokens: its first n_ctx token embeddings
  are the learnable context and the rest of the phrase stays fixed before the class name. The official code
  uses CTX_INIT only when N_CTX <= 4 and otherwise silently falls back to random vectors ("X" placeholders);
  here the phrase is used whatever --n-ctx is, and a phrase with fewer tokens than --n-ctx is refused (the
  official code would take its end-of-text and padding embeddings as context).
- The prompts and projections are trained in fp32 and only the frozen encoders run in fp16/bf16 under
  autocast; the official code casts the prompts to fp16 inside the encoders (it fails in fp32 as released)
  and casts `proj` to fp16. Here prompts follow the activations' dtype, so fp32, bf16 and fp16 all work.
- Widths come from the loaded model (text: ln_final, vision: conv1), not the hard-coded 512/768 of the
  official code, so any ViT works. A depth beyond the layers of either tower is clipped with a warning;
  ResNet backbones have no tokens to prompt and are refused.
- CLIP is unchanged: the deep prompts are inserted by looping over its residual blocks here, and the
  prompted vision forward is written here from the ViT's own parts (the official code forks clip/model.py).
- There is no --feature-cache (image features depend on the prompts). With --calib zs_norm/penalty the frozen
  zero-shot logits come from the unprompted image encoder, run on the batch only for those two calibs.
- The checkpoint holds only the learned tensors; token_prefix/token_suffix are rebuilt from the class names.
  Official checkpoints (the whole model's state dict under "state_dict") load too: their "prompt_learner."
  tensors are used, the frozen CLIP weights in them are ignored.
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
import copy
import math
import os
import random
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

METHOD = "maple"


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
    p.add_argument("--epochs", type=evaluation.at_least(1), default=5, help="training epochs (the first is the warm-up epoch)")
    p.add_argument("--batch-size", type=evaluation.at_least(1), default=4, help="training batch size")
    p.add_argument("--lr", type=float, default=0.0035, help="peak learning rate of the cosine schedule")
    p.add_argument("--warmup-lr", type=float, default=1e-5, help="constant learning rate of the first epoch")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (applied to the prompts too)")
    p.add_argument("--n-ctx", type=evaluation.at_least(1), default=2, help="number of context vectors (prompt tokens) at every depth")
    p.add_argument("--ctx-init", default="", help='prompt "PHRASE {class}." with the first --n-ctx tokens of the '
                                                  'phrase learnable, e.g. "a photo of a" (MaPLe\'s original init; '
                                                  "default: random N(0, 0.02), DAC's setting)")
    p.add_argument("--prompt-depth", type=evaluation.at_least(1), default=9,
                   help="layers that get prompts: 1 = the input only, 9 = the input and layers 1..8 of both towers "
                        "(clipped to the model's layers)")
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
    p.add_argument("--load", default=None, help="prompt checkpoint to evaluate (ours, or the official MaPLe code's)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow --load to unpickle arbitrary objects (only for files you trust)")
    losses.add_calibration_args(p)
    args = p.parse_args(argv)
    if args.eval_only and not args.load:
        p.error("--eval-only needs --load, the prompt checkpoint to evaluate")
    return args


def _vit_layers(clip_model) -> int:
    """Layers of the shorter tower; refuses backbones without a ViT (no tokens to prompt)."""
    if not isinstance(clip_model.visual, VisionTransformer):
        raise data.UserError(f"MaPLe prompts the tokens of a ViT image encoder; this backbone's image encoder is a "
                             f"ResNet ({type(clip_model.visual).__name__}); use a ViT such as ViT-B/16")
    return min(len(clip_model.transformer.resblocks), len(clip_model.visual.transformer.resblocks))


def clipped_depth(depth: int, layers: int) -> int:
    """A prompt depth within 1..layers: deeper than the towers is clipped with a warning, below 1 is an error."""
    if depth < 1:
        raise data.UserError(f"--prompt-depth must be at least 1 (the input prompts), got {depth}")
    if depth > layers:
        warnings.warn(f"--prompt-depth {depth} exceeds the {layers} layers of this backbone; clipped to {layers}",
                      stacklevel=2)
    return min(depth, layers)


class TextEncoder(nn.Module):
    """CLIP's text transformer run on prompt embeddings, with a new prompt inserted before each deep layer."""

    def __init__(self, clip_model, checkpoint_blocks: bool = False):
        super().__init__()
        self.checkpoint_blocks = checkpoint_blocks
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.dtype = clip_model.dtype

    def forward(self, prompts: torch.Tensor, tokenized_prompts: torch.Tensor, deep_prompts=None) -> torch.Tensor:
        """deep_prompts[str(i)] (n_ctx, D) replaces the hidden states at positions 1..n_ctx before block i
        (like the official code, without a positional embedding)."""
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


class ImageEncoder(nn.Module):
    """CLIP's ViT with vision prompt tokens appended after the patch tokens, replaced before each deep layer.
    Written from the ViT's own parts, so clip/ stays unaware of MaPLe."""

    def __init__(self, clip_model):
        super().__init__()
        _vit_layers(clip_model)
        self.visual = clip_model.visual
        self.dtype = clip_model.dtype

    def forward(self, images: torch.Tensor, shared_ctx: torch.Tensor, deep_prompts) -> torch.Tensor:
        """shared_ctx (n_ctx, W) is appended to the patch tokens; deep_prompts[str(i)] (n_ctx, W) replaces
        them before block i."""
        v = self.visual
        x = v.embed(images.type(self.dtype))  # (B, 1 + grid**2, W): class token, patches, positions
        # The prompt tokens go after the positions are added (they have none) and before ln_pre.
        n_ctx = shared_ctx.shape[0]
        x = torch.cat([x, shared_ctx.type(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)  # (B, N + n_ctx, W)
        x = v.ln_pre(x).permute(1, 0, 2)  # NLD -> LND
        for i, block in enumerate(v.transformer.resblocks):
            if str(i) in deep_prompts:  # replace the previous layer's prompt outputs by this layer's prompts
                ctx = deep_prompts[str(i)].type(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)  # (n_ctx, B, W)
                x = torch.cat([x[:-n_ctx], ctx], dim=0)  # (N + n_ctx, B, W)
            x = block(x)
        return v.ln_post(x[0]) @ v.proj  # class token: (B, W) -> (B, E)


class MultiModalPromptLearner(nn.Module):
    """MaPLe's coupled prompts. Text: n_ctx context vectors `ctx` after SOS, then one prompt per deep layer
    1..depth-1 (`compound_prompts_text`). Vision: every text prompt mapped by its own Linear(D_txt -> D_img):
    `proj` for `ctx`, `compound_prompt_projections[i]` for `compound_prompts_text[i]`."""

    def __init__(self, args, classnames: list[str], clip_model):
        super().__init__()
        n_layers = _vit_layers(clip_model)
        ctx_dim = clip_model.ln_final.weight.shape[0]  # D_txt
        vis_dim = clip_model.visual.conv1.weight.shape[0]  # D_img
        n_ctx, depth = args.n_ctx, clipped_depth(args.prompt_depth, n_layers)
        if args.ctx_init:
            ctx_init = args.ctx_init.replace("_", " ")
            tokens = clip.tokenize(ctx_init, context_length=clip_model.context_length)[0]  # (L,)
            n_tokens = int((tokens > 0).sum()) - 2  # BPE tokens between SOS and EOT
            if n_tokens < n_ctx:
                raise data.UserError(f"--ctx-init {args.ctx_init!r} has {n_tokens} tokens, "
                                     f"fewer than --n-ctx {n_ctx}")
            with torch.no_grad():
                embedding = clip_model.token_embedding(tokens.to(clip_model.positional_embedding.device))  # (L, D)
            ctx_vectors = embedding[1:1 + n_ctx].float()  # (n_ctx, D): the phrase's first tokens; the rest stay fixed
            prompt_prefix = ctx_init
        else:
            ctx_vectors = torch.empty(n_ctx, ctx_dim)
            nn.init.normal_(ctx_vectors, std=0.02)
            prompt_prefix = " ".join(["X"] * n_ctx)
        self.ctx = nn.Parameter(ctx_vectors.to(clip_model.positional_embedding.device))  # (n_ctx, D), fp32
        self.proj = nn.Linear(ctx_dim, vis_dim)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(nn.init.normal_(torch.empty(n_ctx, ctx_dim), std=0.02)) for _ in range(depth - 1)])
        # As in the official code, the deep maps start as copies of one randomly initialised layer.
        single_layer = nn.Linear(ctx_dim, vis_dim)
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(single_layer) for _ in range(depth - 1)])
        self.n_ctx, self.prompt_prefix, self.depth = n_ctx, prompt_prefix, depth
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

    def deep_text_prompts(self) -> dict[str, torch.Tensor]:
        """The text prompts of blocks 1..depth-1, keyed by the block they enter, each (n_ctx, D)."""
        return {str(i): prompt for i, prompt in enumerate(self.compound_prompts_text, start=1)}

    def vision_prompts(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The vision prompts of the input, (n_ctx, D_img), and of blocks 1..depth-1 keyed by the block, each
        (n_ctx, D_img): every text prompt through its own map."""
        deep = {str(i): layer(prompt) for i, (layer, prompt) in
                enumerate(zip(self.compound_prompt_projections, self.compound_prompts_text), start=1)}
        return self.proj(self.ctx), deep


class CustomCLIP(nn.Module):
    def __init__(self, args, classnames: list[str], clip_model):
        super().__init__()
        self.prompt_learner = MultiModalPromptLearner(args, classnames, clip_model)
        self.image_encoder = ImageEncoder(clip_model)
        self.text_encoder = TextEncoder(clip_model, args.checkpoint_text)
        self.logit_scale = clip_model.logit_scale
        self.dtype = clip_model.dtype

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised features (B, E) of the prompted image encoder: they change with the learned prompts."""
        shared_ctx, deep = self.prompt_learner.vision_prompts()
        return F.normalize(self.image_encoder(images.type(self.dtype), shared_ctx, deep).float(), dim=-1)  # (B, E)

    def text_features(self) -> torch.Tensor:
        prompts = self.prompt_learner()  # (C, L, D)
        x = self.text_encoder(prompts, self.prompt_learner.tokenized_prompts, self.prompt_learner.deep_text_prompts())
        return F.normalize(x.float(), dim=-1)  # (C, E)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) from normalised features (B, E) of image_features(): evaluation encodes each test image
        once with the trained prompts and scores the features against any class list."""
        return self.logit_scale.exp().float() * image_features @ self.text_features().t()


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device, amp_dtype = evaluation.pick_device(args.device, args.precision)
    amp = dict(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # the frozen encoders' autocast
    run_dir = evaluation.run_dir(args, METHOD)

    # Data: the few-shot training split and the test splits of the protocol (all checked before training).
    train, targets = data.protocol_splits(args.protocol, args.dataset, args.root, args.shots, args.seed)
    clip_model = evaluation.load_backbone(args.backbone, device, amp_dtype)
    n_px = clip_model.visual.input_resolution
    print(f"{METHOD} on {args.dataset} ({args.protocol}): {len(train.classnames)} training classes, "
          f"{len(train.train)} training images, device {device}, precision {amp_dtype or torch.float32}")

    # Model: only the prompt learner (prompts and their vision maps) trains.
    model = CustomCLIP(args, train.classnames, clip_model).to(device)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("prompt_learner."))
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    print(f"trainable: {', '.join(trainable)} ({sum(trainable.values())} values)")
    logit_scale = model.logit_scale.exp().float()  # CLIP's frozen logit scale, a 0-dim fp32 tensor
    if args.load:
        state = evaluation.read_checkpoint(args.load, allow_pickle=args.allow_pickle)
        if any(k.startswith("prompt_learner.") for k in state):  # an official file: the whole model's state dict
            state = {k[len("prompt_learner."):]: v for k, v in state.items() if k.startswith("prompt_learner.")}
        state = {k: v for k, v in state.items() if k not in ("token_prefix", "token_suffix")}  # rebuilt, not loaded
        evaluation.load_prompt_state(model.prompt_learner, state, args.load)

    train_time = 0.0
    if not args.eval_only:
        # Frozen zero-shot text features W0 of the training classes (CoOp template), computed once.
        zs_text = evaluation.text_features(clip_model, data.prompts(args.dataset, train.classnames, "coop"))  # (C, E)
        t0 = time.time()  # training time includes decoding the images
        # Decoded once; each batch is cropped, flipped, resized and normalised on the device (data.TrainImages).
        loader = data.TrainImages(train.train, n_px, args.batch_size, device, args.seed, train.min_crop,
                                  int(args.image_cache_gb * 2**30), args.workers)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        for epoch in range(args.epochs):
            lr = args.warmup_lr if epoch == 0 else 0.5 * args.lr * (1 + math.cos(math.pi * (epoch - 1) / args.epochs))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            seen = 0
            for batch, labels in loader:
                with torch.autocast(**amp):
                    image_features = model.image_features(batch)  # (B, E), prompted: gradients reach the prompts
                    text_features = model.text_features()  # (C, E)
                    with torch.no_grad():  # the frozen, unprompted CLIP's view of the batch, for ZS-Norm / Penalty
                        zs_image = F.normalize(clip_model.encode_image(batch).float(), dim=-1) \
                            if losses.needs_zs_logits(args.calib) else None  # (B, E)
                logits = logit_scale * image_features @ text_features.t()  # (B, C), fp32
                zs_logits = logit_scale * zs_image @ zs_text.t() \
                    if losses.needs_zs_logits(args.calib) else None  # (B, C)
                loss = (F.cross_entropy(logits, labels)
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
        train_time = time.time() - t0
        evaluation.save_prompt(model.prompt_learner.state_dict(), run_dir / "prompt.pt")

    # Evaluation: each test image goes through the prompted image encoder once per split; raw, TS and DAC come
    # from the same features.
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
