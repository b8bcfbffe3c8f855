"""CoOp: Learning to Prompt for Vision-Language Models (Zhou et al., IJCV 2022), https://arxiv.org/abs/2109.01134

CoOp replaces CLIP's hand-written prompt "a photo of a {class}." with n_ctx learnable context vectors
shared by all classes, "[V]_1 ... [V]_n {class}.", trained with cross-entropy on few-shot images while
both CLIP encoders stay frozen. It is the base every other method file in methods/ is diffed against.

With --calib ours the loss gains the two regularizers of "Towards Calibrating Prompt Tuning of
Vision-Language Models" (CVPR 2026): the mean-variance margin penalty on the training logits and text
moment matching to frozen zero-shot text features (losses.py); other values select the baselines.

Example:
    python methods/coop.py --dataset oxford_pets --root data --seed 1 --calib ours

Recipe (defaults): DAC's ViT-B/16 setting, 16 random context vectors, class token at the end, 200
epochs, batch 32, SGD lr 0.002 (momentum 0.9, weight decay 5e-4), one warm-up epoch at 1e-5, then a
per-epoch cosine schedule (DAC's setting, Wang et al., ICML 2024).

Deviations from the official code:
- The context vectors are trained in fp32 and only the frozen encoders run in fp16/bf16 under autocast;
  the official code keeps the prompts in fp16 and steps fp16 parameters directly.
- The image encoder is frozen, so test-set image features are computed once per split and reused by
  every classifier and post-hoc variant; training images still go through the encoder every step
  (fresh augmentation), unless --feature-cache asks for precomputed views.
- The checkpoint holds only the learned tensors (`ctx`); token_prefix/token_suffix are rebuilt from the
  class names, so one checkpoint serves any class list (official checkpoints load too).
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
import sys
import time

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

METHOD = "coop"


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
    p.add_argument("--epochs", type=evaluation.at_least(1), default=200, help="training epochs (the first is the warm-up epoch)")
    p.add_argument("--batch-size", type=evaluation.at_least(1), default=32, help="training batch size")
    p.add_argument("--lr", type=float, default=0.002, help="peak learning rate of the cosine schedule")
    p.add_argument("--warmup-lr", type=float, default=1e-5, help="constant learning rate of the first epoch")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (applied to the prompts too)")
    p.add_argument("--n-ctx", type=evaluation.at_least(1), default=16, help="number of context vectors (ignored with --ctx-init)")
    p.add_argument("--ctx-init", default="",
                   help='initialise the context from this phrase; "" = --n-ctx random N(0, 0.02) vectors (default: "")')
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--precision", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="autocast dtype of the frozen encoders; auto = fp16 on CUDA, fp32 elsewhere")
    p.add_argument("--workers", type=evaluation.at_least(0), default=None,
                   help="processes decoding evaluation images, threads decoding training images "
                        "(unset: min(8, CPUs) on CUDA, 0 elsewhere)")
    p.add_argument("--image-cache-gb", type=float, default=2.0,
                   help="decoded training images up to this size are kept on the training device, more in "
                        "host memory (augmentation runs on the device every step)")
    p.add_argument("--feature-cache", type=evaluation.at_least(0), default=0, metavar="K",
                   help="opt-in speed-up, a deviation from the protocol: encode K augmented views per training "
                        "image once and draw one per epoch (0 = off: fresh augmentation every step)")
    p.add_argument("--checkpoint-text", action="store_true",
                   help="activation checkpointing in the text encoder: far less memory for many classes, "
                        "same gradients, about a third more text-side compute")
    p.add_argument("--eval-only", action="store_true", help="skip training and evaluate the prompt given by --load")
    p.add_argument("--load", default=None, help="prompt checkpoint to evaluate (ours, or the official CoOp code's)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow --load to unpickle arbitrary objects (only for files you trust)")
    losses.add_calibration_args(p)
    args = p.parse_args(argv)
    if args.eval_only and not args.load:
        p.error("--eval-only needs --load, the prompt checkpoint to evaluate")
    return args


class TextEncoder(nn.Module):
    """CLIP's text transformer run on prompt embeddings instead of token ids."""

    def __init__(self, clip_model, checkpoint_blocks: bool = False):
        super().__init__()
        self.checkpoint_blocks = checkpoint_blocks
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.dtype = clip_model.dtype

    def forward(self, prompts: torch.Tensor, tokenized_prompts: torch.Tensor) -> torch.Tensor:
        # Prompts are cut after their last end-of-text token (clip.trim), so L can be shorter than the context.
        x = prompts.type(self.dtype) + self.positional_embedding[: prompts.shape[1]].type(self.dtype)  # (C, L, D)
        x = x.permute(1, 0, 2)  # NLD -> LND
        for block in self.transformer.resblocks:
            # With --checkpoint-text only each block's input is kept; its activations are recomputed in backward.
            x = checkpoint(block, x, use_reentrant=False) if self.checkpoint_blocks and x.requires_grad else block(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_final(x).type(self.dtype)
        # The feature is read at the end-of-text token, which has the largest id in every prompt.
        return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ self.text_projection  # (C, E)


class PromptLearner(nn.Module):
    """n_ctx context vectors shared by all classes, placed between SOS and "{class}." (class token at the end)."""

    def __init__(self, args, classnames: list[str], clip_model):
        super().__init__()
        ctx_dim = clip_model.ln_final.weight.shape[0]
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


class CustomCLIP(nn.Module):
    def __init__(self, args, classnames: list[str], clip_model):
        super().__init__()
        self.prompt_learner = PromptLearner(args, classnames, clip_model)
        self.image_encoder = clip_model.visual
        self.text_encoder = TextEncoder(clip_model, args.checkpoint_text)
        self.logit_scale = clip_model.logit_scale
        self.dtype = clip_model.dtype

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_encoder(images.type(self.dtype)).float(), dim=-1)  # (B, E)

    def text_features(self) -> torch.Tensor:
        prompts = self.prompt_learner()  # (C, L, D)
        return F.normalize(self.text_encoder(prompts, self.prompt_learner.tokenized_prompts).float(), dim=-1)  # (C, E)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) from normalised image features (B, E): the image encoder is frozen, so callers
        compute the features once and pass them in."""
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

    # Model: only the prompt learner trains.
    model = CustomCLIP(args, train.classnames, clip_model).to(device)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("prompt_learner."))
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    print(f"trainable: {', '.join(trainable)} ({sum(trainable.values())} values)")
    logit_scale = model.logit_scale.exp().float()  # CLIP's frozen logit scale, a 0-dim fp32 tensor
    if args.load:
        state = evaluation.read_checkpoint(args.load, allow_pickle=args.allow_pickle)
        state = {k: v for k, v in state.items() if k not in ("token_prefix", "token_suffix")}  # rebuilt, not loaded
        evaluation.load_prompt_state(model.prompt_learner, state, args.load)

    train_time = 0.0
    if not args.eval_only:
        # Frozen zero-shot text features W0 of the training classes (CoOp template), computed once.
        zs_text = evaluation.text_features(clip_model, data.prompts(args.dataset, train.classnames, "coop"))  # (C, E)
        t0 = time.time()  # training time includes decoding the images (and --feature-cache encoding)
        # Decoded once; each batch is cropped, flipped, resized and normalised on the device (data.TrainImages).
        loader = data.TrainImages(train.train, n_px, args.batch_size, device, args.seed, train.min_crop,
                                  int(args.image_cache_gb * 2**30), args.workers)
        if args.feature_cache:  # K pre-encoded augmented views per image: training runs only the text side
            loader = data.FeatureViews(loader, model.image_features, args.feature_cache)
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
                    with torch.no_grad():  # the image encoder is frozen; batch holds features with --feature-cache
                        image_features = batch if args.feature_cache else model.image_features(batch)  # (B, E)
                    text_features = model.text_features()  # (C, E)
                logits = logit_scale * image_features @ text_features.t()  # (B, C), fp32
                zs_logits = logit_scale * image_features @ zs_text.t() \
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

    # Evaluation: each test image is encoded once per split; raw, TS and DAC come from the same features.
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
