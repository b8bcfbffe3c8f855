"""ProDA: Prompt Distribution Learning (Lu et al., CVPR 2022), https://arxiv.org/abs/2205.03340

ProDA learns a set of 32 CoOp-style prompts (16 context vectors each, shared by all classes) instead of
one, with the class name at three positions: prompts 0-7 "[class] [V]_1..[V]_16.", prompts 8-15
"[V]_1..[V]_8 [class] [V]_9..[V]_16.", prompts 16-31 "[V]_1..[V]_16 [class].". The text features of a
class under the prompts are treated as a Gaussian. Each step trains 4 prompts (the next 4 of a random
permutation of the 32, redrawn every 8 steps): the classifier is the per-class mean of the 4 prompts'
normalised features (not renormalised), and the logits get the Gaussian upper-bound correction
0.5 * s^2 * sigma_{b,j}, sigma_{b,j} = R_b[y,y] + R_b[j,j] - 2 R_b[y,j], R_b[i,k] = sum_d f_{b,d}^2
cov_d(i,k), the diagonal covariance taken over the 4 prompts and divided by 4 + 1. A second term,
0.1 * mean |cos| between the class-free features of all 32 prompts (each context encoded as "[V]_1..[V]_16."),
keeps the prompts diverse. At test time the classifier is the mean over all 32 prompts' normalised
features, again not renormalised. There is no official code; the protocol follows DAC's implementation
(ml-stat-Sustech/CLIP_Calibration), which the paper under reproduction uses.

With --calib ours the loss gains the two regularizers of "Towards Calibrating Prompt Tuning of
Vision-Language Models" (CVPR 2026): the mean-variance margin penalty on the training logits and text
moment matching to frozen zero-shot text features (losses.py); other values select the baselines.
The calibration terms see the same logits as the cross-entropy (with the Gaussian correction), and the
tuned text features they (and DAC) use are the mean-prompt class features renormalised to unit length:
during training the mean of the step's 4 prompts, at test time the mean of all 32.

Example:
    python methods/proda.py --dataset oxford_pets --root data --seed 1 --calib ours

Recipe (defaults): DAC's ViT-B/16 setting, 32 prompts x 16 random N(0, 0.02) context vectors, 4 prompts per
step, orthogonality weight 0.1, 100 epochs, batch 4, SGD lr 0.001 (momentum 0.9, weight decay 5e-4), one
warm-up epoch at 1e-5, then a per-epoch cosine schedule (DAC's setting, Wang et al., ICML 2024).
Memory: every step encodes 4 x C class prompts plus the 32 class-free prompts (--checkpoint-text helps for
many classes); testing encodes 32 x C prompts, in chunks.

Deviations from the public (DAC) code:
- Class names are tokenised with spaces ("Highway or Road"); the public code tokenises the raw names with
  underscores but measures the class-name length on the cleaned names, so the front/middle prompts of
  multi-word names are cut in the wrong place. Here the class-name span is the tokenised cleaned name,
  checked against the prompt's tokens.
- The front and middle prompts are built as permutations of the end prompt's token positions (one gather)
  instead of a Python loop over classes; sigma is computed as sum_d f_d^2 sum_p (c_{y,p,d} - c_{j,p,d})^2 / 5
  (c = prompt features minus the class mean), algebraically the public formula, in (B, C, P, E) memory
  instead of the public (E, C, C) covariance tensor.
- The context vectors are trained in fp32 and only the frozen encoders run in fp16/bf16 under autocast;
  the public code keeps the prompts in fp16 and steps fp16 parameters directly.
- The test classifier encodes the 32 x C prompts in chunks that cover every prompt (the public code's
  out-of-memory fallback drops the remainder of its 1000-sequence chunks).
- The image encoder is frozen, so test-set image features are computed once per split and reused by
  every classifier and post-hoc variant; training images still go through the encoder every step
  (fresh augmentation), unless --feature-cache asks for precomputed views.
- The checkpoint holds only the learned tensors (`ctx`, 32 x 16 x D); the token buffers (token_prefix,
  token_suffix, nc_token_prefix, nc_token_suffix) are rebuilt from the class names, so one checkpoint
  serves any class list (the public code's checkpoints load too).
- No --ctx-init: the context is random, as in the public ProDA. As there, the prompt permutation runs on
  across epochs.
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

METHOD = "proda"


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
    p.add_argument("--epochs", type=evaluation.at_least(1), default=100, help="training epochs (the first is the warm-up epoch)")
    p.add_argument("--batch-size", type=evaluation.at_least(1), default=4, help="training batch size")
    p.add_argument("--lr", type=float, default=0.001, help="peak learning rate of the cosine schedule")
    p.add_argument("--warmup-lr", type=float, default=1e-5, help="constant learning rate of the first epoch")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (applied to the prompts too)")
    p.add_argument("--n-ctx", type=evaluation.at_least(1), default=16, help="context vectors per prompt (random N(0, 0.02))")
    p.add_argument("--n-prompt", type=evaluation.at_least(1), default=32,
                   help="number of prompts: the first quarter with the class name in front, the second quarter "
                        "in the middle, the rest at the end")
    p.add_argument("--prompt-bs", type=evaluation.at_least(1), default=4,
                   help="prompts trained per step: the next ones of a random permutation of all prompts, "
                        "redrawn every n-prompt / prompt-bs steps")
    p.add_argument("--orth-weight", type=float, default=0.1,
                   help="weight of the mean |cosine| between the prompts' class-free features (DAC's PRODA.ALPHA)")
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


FRONT, MIDDLE, END = 0, 1, 2  # class-name positions, the values of PromptLearner.pos


class PromptLearner(nn.Module):
    """n_prompt prompts of n_ctx context vectors each, shared by all classes; the class name sits in front of,
    in the middle of, or after the context (PromptLearner.pos)."""

    def __init__(self, args, classnames: list[str], clip_model):
        super().__init__()
        ctx_dim = clip_model.ln_final.weight.shape[0]
        n_prompt, n_ctx, prompt_bs = args.n_prompt, args.n_ctx, args.prompt_bs
        if n_prompt < 1 or n_ctx < 1 or prompt_bs < 1 or n_prompt % prompt_bs:
            raise data.UserError(f"--n-prompt ({n_prompt}) must be a positive multiple of --prompt-bs "
                                 f"({prompt_bs}), and --n-ctx ({n_ctx}) positive")
        ctx_vectors = torch.empty(n_prompt, n_ctx, ctx_dim)
        nn.init.normal_(ctx_vectors, std=0.02)
        self.ctx = nn.Parameter(ctx_vectors.to(clip_model.positional_embedding.device))  # (n_prompt, n_ctx, D), fp32
        self.n_prompt, self.n_ctx, self.prompt_bs = n_prompt, n_ctx, prompt_bs
        self.prompt_prefix = " ".join(["X"] * n_ctx)
        quarter = n_prompt // 4  # 32 prompts: 8 front, 8 middle, 16 end (a single prompt: end)
        pos = [FRONT] * quarter + [MIDDLE] * quarter + [END] * (n_prompt - 2 * quarter)
        self.register_buffer("pos", torch.tensor(pos, device=self.ctx.device), persistent=False)  # (n_prompt,)
        self.iter_idx = 0  # steps taken in the current permutation of the prompts

        # Class-free prompts "X ... X." (each prompt's context without a class name) for the orthogonality term.
        tokenized = clip.tokenize(self.prompt_prefix + ".", context_length=clip_model.context_length)
        tokenized = clip.trim(tokenized).to(self.ctx.device)  # (1, L), cut after EOT
        with torch.no_grad():
            embedding = clip_model.token_embedding(tokenized).type(clip_model.dtype)  # (1, L, D)
        self.register_buffer("nc_token_prefix", embedding[:, :1], persistent=False)  # (1, 1, D) SOS
        self.register_buffer("nc_token_suffix", embedding[:, 1 + n_ctx:], persistent=False)  # (1, L-1-n_ctx, D)
        self.nc_tokenized_prompts = tokenized
        self.set_classnames(classnames, clip_model)

    @torch.no_grad()
    def set_classnames(self, classnames: list[str], clip_model) -> None:
        """Rebuild the fixed token buffers and the front/middle layouts for a class list."""
        names = [data.clean_classname(name) for name in classnames]  # tokenised with spaces, not underscores
        prompts = [f"{self.prompt_prefix} {name}." for name in names]
        tokenized = clip.tokenize(prompts, context_length=clip_model.context_length)  # (C, context_length)
        # Cut after the last EOT: the causal text transformer never looks past it, so the padding is wasted work.
        tokenized = clip.trim(tokenized).to(self.ctx.device)  # (C, L)
        name_ids = clip.tokenize(names, context_length=clip_model.context_length)  # (C, L): SOS name EOT
        name_lens = ((name_ids > 0).sum(dim=1) - 2).tolist()
        L, start = tokenized.shape[1], 1 + self.n_ctx  # start: the class name's first position in the end prompt
        for name, ids, n_len, row in zip(names, name_ids, name_lens, tokenized.cpu()):
            if not torch.equal(row[start:start + n_len], ids[1:1 + n_len]):  # e.g. a name ending in punctuation
                raise data.UserError(f"class name {name!r} tokenises differently inside the prompt; "
                                     f"cannot place it in front of or in the middle of the context")
        embedding = clip_model.token_embedding(tokenized).type(clip_model.dtype)  # (C, L, D)
        # Not persistent: a checkpoint holds only the learned tensors; these are rebuilt from the names.
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)  # (C, 1, D) SOS
        self.register_buffer("token_suffix", embedding[:, 1 + self.n_ctx:], persistent=False)  # (C, L-1-n_ctx, D)
        # The front and middle prompts hold the same tokens as the end prompt "SOS ctx name . EOT pad", in
        # another order (same length, so the EOT position and tokenized_prompts are shared): layout[k, c]
        # lists, for each output position, the position of the end prompt of class c it takes its token from.
        half, layout = self.n_ctx // 2, []
        for n_len in name_lens:
            ctx, name, rest = list(range(1, start)), list(range(start, start + n_len)), list(range(start + n_len, L))
            front = [0] + name + ctx + rest
            middle = [0] + ctx[:half] + name + ctx[half:] + rest
            layout.append([front, middle, list(range(L))])
        self.register_buffer("layout", torch.tensor(layout, device=self.ctx.device).transpose(0, 1),
                             persistent=False)  # (3, C, L), indexed by pos
        self.tokenized_prompts = tokenized
        self.n_cls = len(classnames)

    def next_prompt_ids(self) -> torch.Tensor:
        """The prompt_bs prompts of this training step: consecutive slices of a random permutation of all
        prompts, redrawn every n_prompt / prompt_bs steps (the count runs on across epochs)."""
        if self.iter_idx == 0:
            self.select_idx = torch.randperm(self.n_prompt, device=self.ctx.device)
        ids = self.select_idx[self.iter_idx * self.prompt_bs:(self.iter_idx + 1) * self.prompt_bs]  # (P,)
        self.iter_idx = (self.iter_idx + 1) % (self.n_prompt // self.prompt_bs)
        return ids

    def forward(self, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings (C*P, L, D), class-major, of the prompts `prompt_ids` (P,), with their token ids."""
        ctx = self.ctx[prompt_ids]  # (P, n_ctx, D)
        C, P, D = self.n_cls, ctx.shape[0], ctx.shape[2]
        end = torch.cat([self.token_prefix.type(ctx.dtype).unsqueeze(1).expand(-1, P, -1, -1),
                         ctx.unsqueeze(0).expand(C, -1, -1, -1),
                         self.token_suffix.type(ctx.dtype).unsqueeze(1).expand(-1, P, -1, -1)], dim=2)  # (C, P, L, D)
        index = self.layout[self.pos[prompt_ids]].transpose(0, 1)  # (C, P, L)
        prompts = end.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, D))  # (C, P, L, D), each in its layout
        tokenized = self.tokenized_prompts.repeat_interleave(P, dim=0)  # (C*P, L)
        return prompts.flatten(0, 1), tokenized  # (C*P, L, D)

    def class_free_prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every prompt's context without a class name, "SOS ctx . EOT": (n_prompt, L, D) and token ids."""
        n = self.n_prompt
        prompts = torch.cat([self.nc_token_prefix.type(self.ctx.dtype).expand(n, -1, -1), self.ctx,
                             self.nc_token_suffix.type(self.ctx.dtype).expand(n, -1, -1)], dim=1)  # (n_prompt, L, D)
        return prompts, self.nc_tokenized_prompts.expand(n, -1)


def gaussian_correction(image_features: torch.Tensor, prompt_features: torch.Tensor,
                        labels: torch.Tensor) -> torch.Tensor:
    """ProDA's logit correction sigma (B, C) (Lu et al. 2022, eq. 9, diagonal covariance, as in DAC's code).

    sigma_{b,j} = R_b[y,y] + R_b[j,j] - 2 R_b[y,j] with R_b[i,k] = sum_d f_{b,d}^2 cov_d(i,k), where
    cov_d(i,k) = sum_p c_{i,p,d} c_{k,p,d} / (P + 1) and c = prompt features minus their class mean; this equals
    sum_d f_{b,d}^2 sum_p (c_{y,p,d} - c_{j,p,d})^2 / (P + 1), computed without the (D, C, C) tensor.
    It is 0 for the true class and >= 0 elsewhere. image_features (B, E) normalised; prompt_features (C, P, E).
    """
    P = prompt_features.shape[1]
    centred = prompt_features - prompt_features.mean(dim=1, keepdim=True)  # (C, P, E)
    diff = centred[labels].unsqueeze(1) - centred.unsqueeze(0)  # (B, C, P, E)
    return (diff.pow(2).sum(dim=2) * image_features.pow(2).unsqueeze(1)).sum(dim=-1) / (P + 1)  # (B, C)


def mean_abs_cosine(features: torch.Tensor) -> torch.Tensor:
    """Mean |cos| between distinct rows of normalised features (n, E): ProDA's prompt orthogonality term."""
    n = len(features)
    if n < 2:  # a single prompt has no pair (the public code would take the mean of nothing: NaN)
        return features.new_zeros(())
    cos = (features @ features.t()).abs()  # (n, n)
    # masked_fill rather than boolean indexing: no data-dependent shape, so no host sync on the GPU
    return cos.masked_fill(torch.eye(n, dtype=torch.bool, device=cos.device), 0).sum() / (n * (n - 1))


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

    def prompt_features(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Normalised class text features under each prompt of `prompt_ids` (P,): (C, P, E)."""
        prompts, tokenized = self.prompt_learner(prompt_ids)  # (C*P, L, D)
        features = F.normalize(self.text_encoder(prompts, tokenized).float(), dim=-1)  # (C*P, E)
        return features.view(self.prompt_learner.n_cls, len(prompt_ids), -1)  # (C, P, E)

    def class_free_features(self) -> torch.Tensor:
        """Normalised features of every prompt's class-free context: (n_prompt, E)."""
        return F.normalize(self.text_encoder(*self.prompt_learner.class_free_prompts()).float(), dim=-1)

    def text_features(self, max_sequences: int = 4096) -> torch.Tensor:
        """Test-time classifier: the mean over all prompts of the normalised class features, not renormalised
        (C, E). The C x n_prompt prompts are encoded in chunks of whole prompts (about max_sequences each)."""
        ids = torch.arange(self.prompt_learner.n_prompt, device=self.prompt_learner.ctx.device)
        chunk = max(1, max_sequences // self.prompt_learner.n_cls)
        return torch.cat([self.prompt_features(part) for part in ids.split(chunk)], dim=1).mean(dim=1)  # (C, E)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Test-time logits (B, C) from normalised image features (B, E): the image encoder is frozen, so
        callers compute the features once and pass them in."""
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
        state = {k: v for k, v in state.items() if not k.endswith(("token_prefix", "token_suffix"))}  # rebuilt
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
                prompt_ids = model.prompt_learner.next_prompt_ids()  # (P,) the prompts trained in this step
                with torch.autocast(**amp):
                    with torch.no_grad():  # the image encoder is frozen; batch holds features with --feature-cache
                        image_features = batch if args.feature_cache else model.image_features(batch)  # (B, E)
                    prompt_features = model.prompt_features(prompt_ids)  # (C, P, E), each prompt normalised
                    class_free = model.class_free_features()  # (n_prompt, E), all prompts
                text_mean = prompt_features.mean(dim=1)  # (C, E), the step's classifier, not renormalised
                text_features = F.normalize(text_mean, dim=-1)  # (C, E) for --calib
                logits = logit_scale * image_features @ text_mean.t() \
                    + 0.5 * logit_scale ** 2 * gaussian_correction(image_features, prompt_features, labels)  # (B, C), fp32
                zs_logits = logit_scale * image_features @ zs_text.t() \
                    if losses.needs_zs_logits(args.calib) else None  # (B, C)
                loss = (F.cross_entropy(logits, labels)
                        + args.orth_weight * mean_abs_cosine(class_free)  # ProDA's prompt-diversity term
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
    def classifier(classnames: tuple[str, ...], key: str) -> torch.Tensor:
        model.prompt_learner.set_classnames(classnames, clip_model)
        with torch.autocast(**amp):
            return model.text_features().float()  # (C, E): the mean over all prompts, not renormalised

    def tuned_text_fn(classnames: tuple[str, ...], key: str) -> torch.Tensor:
        return F.normalize(classifier(classnames, key), dim=-1)  # DAC compares directions: renormalised

    def logits_fn(features: torch.Tensor, classnames: tuple[str, ...], key: str) -> torch.Tensor:
        # The product runs outside autocast, so evaluation logits are fp32 like the training logits.
        return logit_scale * features.to(device) @ classifier(classnames, key).t()  # (N, C)

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
