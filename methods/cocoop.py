"""CoCoOp: Conditional Prompt Learning for Vision-Language Models (Zhou et al., CVPR 2022), https://arxiv.org/abs/2203.05557

CoCoOp keeps CoOp's learnable context but makes it depend on the image: a small meta-net maps the
image feature f_i to a bias pi_i that is added to every context vector, ctx_i = ctx + pi_i, so each
image gets its own set of C class prompts "[ctx_i] {class}." and its own text features. As in the
official code, the meta-net reads the L2-normalised image feature. Only the context and the meta-net
(Linear(E -> E/16) - ReLU - Linear(-> D)) train; both CLIP encoders stay frozen.

With --calib ours the loss gains the two regularizers of "Towards Calibrating Prompt Tuning of
Vision-Language Models" (CVPR 2026): the mean-variance margin penalty on the training logits and text
moment matching to frozen zero-shot text features (losses.py); other values select the baselines. The
moment term uses each image's own text features, (B, C, E), averaged over the batch; at batch 1 the
margin variance is zero, as in the paper.

Example:
    python methods/cocoop.py --dataset oxford_pets --root data --seed 1 --calib ours

Recipe (defaults): DAC's ViT-B/16 setting, 4 context vectors initialised from "a photo of a", class
token at the end, 10 epochs, batch 1, SGD lr 0.002 (momentum 0.9, weight decay 5e-4, also on the
meta-net), one warm-up epoch at 1e-5, then a per-epoch cosine schedule (DAC's setting, Wang et al., ICML 2024).

Batched text encoder: the official code runs the text encoder once per image in a Python loop. Here the
B x C image-conditioned prompts are flattened to (B*C, L, D) and encoded in chunks of --chunk-size
prompts (same logits, tested against the loop). At test time the images are taken in groups of
max(1, chunk_size // C), so an encoder pass holds at most chunk_size prompts and a group's prompt tensor
at most max(chunk_size, C), which keeps ImageNet's 500 or 1000 classes on one GPU. The default 1024
(about 25k tokens for prompts cut after EOT at ~25 tokens) keeps a GPU busy and makes a batch-1 training
step one pass for up to 1024 classes. In training all chunks stay in the autograd graph, so memory grows
with B*C as in the official code; --checkpoint-text keeps only each block's input.

DAC needs one (C, E) text feature per class, but CoCoOp's depend on the image. tuned_text_fn conditions
every class list (the training classes and every test split) on one fixed vector: the L2-normalised mean
of the normalised image features of the few-shot validation split of the training classes (the images
temperature scaling is fitted on). One shared conditioning keeps the tuned distances between test and
training classes comparable, and a training class meets its own feature again (distance 0, factor 1).
The DAC code instead uses the features conditioned on one arbitrary image (the last of the last base
validation batch for the training classes, the last of the first test batch for the test classes).

Deviations from the official code:
- The context vectors and the meta-net are trained in fp32 and only the frozen encoders run in fp16/bf16
  under autocast; the official code keeps the prompts and the meta-net in fp16 and steps them directly.
- One batched, chunked text-encoder pass over all B x C prompts instead of a loop over the images.
- The number of context vectors is the number of BPE tokens of --ctx-init (the official code counts
  words; the same 4 for "a photo of a").
- The image encoder is frozen, so test-set image features are computed once per split and reused by
  every classifier and post-hoc variant; training images still go through the encoder every step
  (fresh augmentation), unless --feature-cache asks for precomputed views.
- The checkpoint holds only the learned tensors (`ctx`, `meta_net.*`); token_prefix/token_suffix are
  rebuilt from the class names, so one checkpoint serves any class list (official checkpoints load too).
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
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import clip  # noqa: E402
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import losses  # noqa: E402

METHOD = "cocoop"


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
    p.add_argument("--epochs", type=evaluation.at_least(1), default=10, help="training epochs (the first is the warm-up epoch)")
    p.add_argument("--batch-size", type=evaluation.at_least(1), default=1, help="training batch size")
    p.add_argument("--lr", type=float, default=0.002, help="peak learning rate of the cosine schedule")
    p.add_argument("--warmup-lr", type=float, default=1e-5, help="constant learning rate of the first epoch")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (applied to the prompts too)")
    p.add_argument("--n-ctx", type=evaluation.at_least(1), default=4, help="number of context vectors (ignored with --ctx-init)")
    p.add_argument("--ctx-init", default="a photo of a",
                   help='initialise the context from this phrase; "" = --n-ctx random N(0, 0.02) vectors')
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
    p.add_argument("--chunk-size", type=evaluation.at_least(1), default=1024,
                   help="image-conditioned prompts per text-encoder pass: a batch's B x C prompts are chunked; "
                        "test images go max(1, chunk-size // C) at a time (bounds memory, same logits)")
    p.add_argument("--eval-only", action="store_true", help="skip training and evaluate the prompt given by --load")
    p.add_argument("--load", default=None, help="prompt checkpoint to evaluate (ours, or the official CoCoOp code's)")
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
    """n_ctx context vectors shifted per image by the meta-net's output, placed between SOS and "{class}."."""

    def __init__(self, args, classnames: list[str], clip_model):
        super().__init__()
        ctx_dim = clip_model.ln_final.weight.shape[0]
        vis_dim = clip_model.visual.output_dim  # E, the image feature the meta-net reads
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
        # Meta-net with the official sub-module names, so released CoCoOp checkpoints load; fp32 parameters.
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, vis_dim // 16)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(vis_dim // 16, ctx_dim)),
        ])).to(self.ctx.device)
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

    def forward(self, im_features: torch.Tensor) -> torch.Tensor:
        """One set of C prompts per image: (B, C, L, D) from normalised image features (B, E)."""
        bias = self.meta_net(im_features).unsqueeze(1)  # (B, 1, D): the same shift for every context token
        ctx = self.ctx.unsqueeze(0) + bias  # (B, n_ctx, D)
        b, c = ctx.shape[0], self.n_cls
        ctx = ctx.unsqueeze(1).expand(-1, c, -1, -1)  # (B, C, n_ctx, D)
        prefix = self.token_prefix.type(ctx.dtype).unsqueeze(0).expand(b, -1, -1, -1)  # (B, C, 1, D)
        suffix = self.token_suffix.type(ctx.dtype).unsqueeze(0).expand(b, -1, -1, -1)  # (B, C, L-1-n_ctx, D)
        return torch.cat([prefix, ctx, suffix], dim=2)  # (B, C, L, D)


class CustomCLIP(nn.Module):
    def __init__(self, args, classnames: list[str], clip_model):
        super().__init__()
        self.prompt_learner = PromptLearner(args, classnames, clip_model)
        self.image_encoder = clip_model.visual
        self.text_encoder = TextEncoder(clip_model, args.checkpoint_text)
        self.chunk_size = args.chunk_size
        self.logit_scale = clip_model.logit_scale
        self.dtype = clip_model.dtype

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_encoder(images.type(self.dtype)).float(), dim=-1)  # (B, E)

    def text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Normalised text features of each image's own C prompts, (B, C, E), from normalised image features
        (B, E): all B x C prompts go through the text encoder together, chunk_size prompts per pass."""
        prompts = self.prompt_learner(image_features)  # (B, C, L, D)
        b, c = prompts.shape[:2]
        prompts = prompts.flatten(0, 1)  # (B*C, L, D), image-major: row i*C + j is image i, class j
        tokens = self.prompt_learner.tokenized_prompts.repeat(b, 1)  # (B*C, L), same order
        feats = torch.cat([self.text_encoder(p, t) for p, t in
                           zip(prompts.split(self.chunk_size), tokens.split(self.chunk_size))])  # (B*C, E)
        return F.normalize(feats.float(), dim=-1).view(b, c, -1)  # (B, C, E)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) from normalised image features (B, E): the image encoder is frozen, so callers
        compute the features once and pass them in. Each image is scored against its own text features."""
        text_features = self.text_features(image_features)  # (B, C, E)
        # Product and sum rather than a matmul, so autocast leaves the cosines in fp32: (B, 1, E) * (B, C, E) -> (B, C).
        return self.logit_scale.exp().float() * (image_features.float().unsqueeze(1) * text_features).sum(-1)


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

    # Model: only the prompt learner (context and meta-net) trains.
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
                    text_features = model.text_features(image_features)  # (B, C, E): each image's own prompts
                # Image i against its own C text features, (B, C) in fp32; the moment term gets the (B, C, E) ones.
                logits = logit_scale * (image_features.unsqueeze(1) * text_features).sum(-1)
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
            return model.text_features(dac_condition)[0]  # (C, E)

    def logits_fn(features: torch.Tensor, classnames: tuple[str, ...], key: str) -> torch.Tensor:
        model.prompt_learner.set_classnames(classnames, clip_model)
        group = max(1, args.chunk_size // len(classnames))  # images per pass: at most max(chunk_size, C) prompts
        with torch.autocast(**amp):
            return torch.cat([model(f.to(device)) for f in tqdm(features.split(group), desc=f"{key}: conditioned "
                              f"prompts", leave=False, dynamic_ncols=True)])  # (N, C)

    t0 = time.time()
    # DAC's (C, E) class features: every class list conditioned on the same vector, the normalised mean
    # normalised image feature of the few-shot validation split (module docstring), computed once; the same
    # features then serve temperature scaling.
    with torch.autocast(**amp):
        val_features, val_labels = evaluation.predict(model.image_features, data.test_loader(
            train.val, n_px, device=device, num_workers=args.workers), device, "val")  # (N, E)
    dac_condition = F.normalize(val_features.mean(dim=0, keepdim=True), dim=-1).to(device)  # (1, E)
    metrics, temperature = evaluation.evaluate_protocol(
        train, targets, encode_fn=model.image_features, logits_fn=logits_fn, tuned_text_fn=tuned_text_fn,
        clip_model=clip_model, dataset=args.dataset, n_px=n_px, device=device, amp_dtype=amp_dtype,
        out_dir=run_dir, num_workers=args.workers, val=(val_features, val_labels))
    timings = {"train_s": train_time, "eval_s": time.time() - t0, "total_s": time.time() - started}
    evaluation.write_results(run_dir, method=METHOD, args=args, metrics=metrics, temperature=temperature,
                             timings=timings)


if __name__ == "__main__":
    with evaluation.user_errors():
        main()
