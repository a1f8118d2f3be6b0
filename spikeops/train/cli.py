"""Command line of ``python -m spikeops.train`` (console script ``spikeops-train``).

Examples::

    python -m spikeops.train --model spikformer_cifar_4_256 --dataset digits --epochs 5 --out runs/digits
    python -m spikeops.train --model spikformer_cifar_4_384 --dataset cifar10 --data-dir data \\
        --recipe spikformer-cifar --amp bf16 --out runs/c10
    torchrun --nproc_per_node 4 -m spikeops.train --model ... --batch-size 128   # 4 x 32 per process
    python -m spikeops.train --model spikformer_v2_8_384 --mode pretrain --dataset imagefolder --data-dir in1k --out runs/pt
    python -m spikeops.train --model spikformer_v2_8_384 --mode finetune --checkpoint runs/pt/encoder.pt ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from spikeops.train import UsageError
from spikeops.train import recipes
from spikeops.train.data import DATASETS, DataError

RECIPE_HELP = (
    "training preset: "
    + "; ".join(
        f"{name}: AdamW lr {r['lr']:g}, wd {r['weight_decay']:g}, batch {r['batch_size']}, {r['epochs']} epochs, "
        f"cosine with {r['warmup_epochs']} warm-up epochs, label smoothing {r['label_smoothing']:g}, T={r['T']}"
        for name, r in recipes.RECIPES.items()
    )
    + ". Only these optimizer/schedule/label-smoothing/T/batch/epoch settings are applied: the RandAugment, "
    "mixup and random erasing of the reference recipes are NOT implemented. Options given explicitly override the preset."
)


def build_parser() -> argparse.ArgumentParser:
    d = recipes.DEFAULTS
    p = argparse.ArgumentParser(
        prog="spikeops-train",
        description="Train a spikeops.models spiking vision transformer (classification, masked pre-training "
                    "of Spikformer V2, fine-tuning). Works under torchrun (DDP).",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", help="registered model name (see --list-models)")
    m.add_argument("--list-models", action="store_true", help="print the model names and exit")
    m.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword for create_model (repeatable; VALUE parsed as a Python literal)")
    m.add_argument("--T", type=int, default=None, help=f"time steps (default {d['T']}; 1 in pretrain mode)")
    m.add_argument("--backend", choices=("auto", "cpp", "triton", "torch"), default="auto",
                   help="spikeops kernel backend passed to the model (default %(default)s)")
    m.add_argument("--mode", choices=("train", "pretrain", "finetune"), default="train",
                   help="train: classification from scratch; pretrain: masked pre-training (spikformer_v2* only), "
                        "writes encoder.pt; finetune: classification starting from --checkpoint (default %(default)s)")
    m.add_argument("--checkpoint", help="finetune: encoder state dict written by --mode pretrain (encoder.pt)")
    m.add_argument("--mask-ratio", type=float, default=0.75, help="pretrain: fraction of patches masked (default %(default)s)")
    m.add_argument("--sync-bn", action="store_true",
                   help="DDP on GPUs: torch.nn.SyncBatchNorm (CUDA only; without it each process uses its own "
                        "batch statistics)")
    m.add_argument("--find-unused-parameters", action="store_true",
                   help="DDP: the model has parameters without gradients (always on in pretrain mode)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: bundled 8x8 handwritten digits (no download); cifar10/cifar100: python archives "
                        "in --data-dir; imagefolder: --data-dir/{train,val}/<class>/<image> (default %(default)s)")
    g.add_argument("--data-dir", help="where cifar10/cifar100/imagefolder data lie")
    g.add_argument("--img-size", type=int, default=None, help="input size (default: 32; imagefolder 224)")
    g.add_argument("--in-channels", type=int, choices=(1, 3), default=3,
                   help="image channels the model takes; digits are repeated to 3 channels (default %(default)s)")
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 0; imagefolder 4)")

    o = p.add_argument_group("optimisation (defaults apply when neither the option nor --recipe sets them)")
    o.add_argument("--recipe", choices=sorted(recipes.RECIPES), default=None, help=RECIPE_HELP)
    o.add_argument("--epochs", type=int, default=None, help=f"number of epochs (default {d['epochs']})")
    o.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch, split evenly over the processes (default {d['batch_size']})")
    o.add_argument("--lr", type=float, default=None, help=f"AdamW peak learning rate (default {d['lr']:g})")
    o.add_argument("--min-lr", type=float, default=None, help=f"learning rate at the end of the cosine (default {d['min_lr']:g})")
    o.add_argument("--weight-decay", type=float, default=None,
                   help=f"AdamW weight decay, not on biases/norm weights (default {d['weight_decay']:g})")
    o.add_argument("--warmup-epochs", type=float, default=None,
                   help=f"linear warm-up, stepped per batch, then cosine per batch (default {d['warmup_epochs']})")
    o.add_argument("--label-smoothing", type=float, default=None, help=f"cross-entropy label smoothing (default {d['label_smoothing']:g})")
    o.add_argument("--amp", choices=("off", "fp16", "bf16"), default="off",
                   help="torch.autocast precision; fp16 uses a GradScaler on CUDA (default %(default)s)")
    o.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps in total (the schedule still spans --epochs); "
                        "--resume continues from there")
    o.add_argument("--seed", type=int, default=0, help="initial weights, data order, augmentation (default %(default)s)")

    r = p.add_argument_group("run")
    r.add_argument("--out", default=None, help="output directory (default runs/<model>-<dataset>-<mode>)")
    r.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available; under torchrun cuda:LOCAL_RANK)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (also off when stderr is not a terminal)")
    r.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (torch.set_num_threads; default: torch's choice, 1 under torchrun)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and resolve: recipe presets and defaults filled in, ``model_args`` parsed."""
    from spikeops.train.modeling import parse_model_args

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_models:
        return args
    if not args.model:
        parser.error("--model is required (see --list-models)")
    explicit = {k: getattr(args, k) for k in recipes.RECIPE_KEYS}
    t_given = args.T is not None
    for k, v in recipes.resolve(explicit, args.recipe).items():
        setattr(args, k, v)
    if args.mode == "pretrain" and not t_given:
        args.T = 1  # Spikformer V2 pre-trains at T=1
    try:
        args.model_args = parse_model_args(args.model_arg)
    except ValueError as exc:
        parser.error(str(exc))
    for name in ("epochs", "batch_size", "T"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be >= 1")
    if args.mode == "finetune" and not args.checkpoint:
        parser.error("--mode finetune needs --checkpoint PATH (the encoder.pt written by --mode pretrain)")
    if args.out is None:
        args.out = str(Path("runs") / f"{args.model}-{args.dataset}-{args.mode}")
    return args


def run(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    """Parse, train, return the summary (raises on errors; :func:`main` prints them)."""
    args = parse_args(argv)
    from spikeops.models import list_models

    if args.list_models:
        print("\n".join(list_models()) or "(no models registered)")
        return None
    if args.model not in list_models():
        raise UsageError(f"unknown model {args.model!r}; known models: {', '.join(list_models()) or '(none)'}")

    from spikeops.train import distributed
    from spikeops.train.loop import Trainer

    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    env = distributed.setup(args.device)
    try:
        return Trainer(args, env).fit()
    finally:
        distributed.cleanup()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: exit status 0, or 2 with a one-line message for bad options or missing data."""
    try:
        run(argv)
    except (UsageError, DataError) as exc:
        print(f"spikeops-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spikeops-train: interrupted; --resume continues from the last checkpoint (<out>/last.pt, "
              "written after every epoch)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
