"""Zero-shot CLIP (Radford et al., ICML 2021), https://arxiv.org/abs/2103.00020: the reference row of every table.

Each class is described by the dataset's hand-written template (data.py's template table, column "coop",
e.g. "a photo of a {}, a type of pet."); an image goes to the class whose text feature is most similar.
Nothing is trained. The run reports base and novel (or cross-dataset) metrics in the same results.json
format as the prompt-tuning methods: raw logits, temperature scaling fitted on the few-shot validation
split of the same seed, and DAC.

Example:
    python methods/zeroshot.py --dataset oxford_pets --root data --seed 1
"""
from __future__ import annotations

import argparse
import functools
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import data  # noqa: E402
import eval as evaluation  # noqa: E402

METHOD = "zeroshot"


def parse_args(argv=None) -> argparse.Namespace:
    p = evaluation.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="oxford_pets", help="dataset key (see data.DATASETS); the source for --protocol xd")
    p.add_argument("--root", default=os.environ.get("DATA", "data"), help="folder holding the datasets (README 'Datasets')")
    p.add_argument("--protocol", default="base2new", choices=data.PROTOCOLS,
                   help="base2new: test base and novel classes; xd: ImageNet, its variants and the other datasets")
    p.add_argument("--seed", type=evaluation.at_least(0), default=1, help="seeds the few-shot validation draw used by temperature scaling")
    p.add_argument("--shots", type=evaluation.at_least(1), default=16, help="shots of the few-shot draw (its validation split fits TS)")
    p.add_argument("--backbone", default="ViT-B/16", help="CLIP model name or checkpoint path")
    p.add_argument("--output", default="output", help="results go to OUTPUT/PROTOCOL/zeroshot/none/DATASET/seedN/")
    p.add_argument("--template", default="coop", choices=["coop", "kgcoop", "prograd"],
                   help="which hand-written template column of data.py's table to use")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--precision", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="autocast dtype of the encoders; auto = fp16 on CUDA, fp32 elsewhere")
    p.add_argument("--workers", type=evaluation.at_least(0), default=None,
                   help="processes decoding evaluation images (unset: min(8, CPUs) on CUDA, 0 elsewhere)")
    p.add_argument("--epochs", type=evaluation.at_least(0), default=0, help="ignored (nothing is trained); accepted so run.sh can pass it")
    p.add_argument("--calib", default="none", choices=["none"], help="zero-shot CLIP has no training-time calibration")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device, amp_dtype = evaluation.pick_device(args.device, args.precision)
    run_dir = evaluation.run_dir(args, METHOD)

    train, targets = data.protocol_splits(args.protocol, args.dataset, args.root, args.shots, args.seed)
    clip_model = evaluation.load_backbone(args.backbone, device, amp_dtype)
    logit_scale = clip_model.logit_scale.exp().float()

    def encode_fn(images: torch.Tensor) -> torch.Tensor:
        return F.normalize(clip_model.encode_image(images).float(), dim=-1)  # (B, E)

    @functools.lru_cache(maxsize=None)  # evaluation asks for each class list's features more than once
    def tuned_text_fn(classnames: tuple[str, ...], key: str) -> torch.Tensor:
        return evaluation.text_features(clip_model, data.prompts(key, classnames, args.template))  # (C, E)

    def logits_fn(features: torch.Tensor, classnames: tuple[str, ...], key: str) -> torch.Tensor:
        return logit_scale * features.to(device) @ tuned_text_fn(classnames, key).t()  # (N, C)

    t0 = time.time()
    metrics, temperature = evaluation.evaluate_protocol(
        train, targets, encode_fn=encode_fn, logits_fn=logits_fn, tuned_text_fn=tuned_text_fn,
        clip_model=clip_model, dataset=args.dataset, n_px=clip_model.visual.input_resolution, device=device,
        amp_dtype=amp_dtype, out_dir=run_dir, num_workers=args.workers)
    timings = {"train_s": 0.0, "eval_s": time.time() - t0, "total_s": time.time() - started}
    evaluation.write_results(run_dir, method=METHOD, args=args, metrics=metrics, temperature=temperature,
                             timings=timings)


if __name__ == "__main__":
    with evaluation.user_errors():
        main()
