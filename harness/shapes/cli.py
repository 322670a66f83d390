"""The `shapes` sub-command: `train` reproduces the shipped weights, `eval` measures them.

`harness/cli.py` mounts it with `add_parser(subparsers)`; it also runs on its own as
`python -m harness.shapes.cli train|eval ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINTS = Path("runs/shapes-checkpoints")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `shapes train` and `shapes eval` on an argparse sub-parsers object."""
    from harness.shapes.model import WEIGHTS_DIR

    parser = subparsers.add_parser("shapes", help="train or evaluate the embedded shapes world")
    actions = parser.add_subparsers(dest="shapes_action", required=True)

    train = actions.add_parser("train", help="train the oracle and the UNet from scratch")
    train.add_argument("--part", choices=("all", "oracle", "unet"), default="all",
                       help="what to train (default: all)")
    train.add_argument("--unet-steps", type=int, default=4600, help="UNet optimiser steps")
    train.add_argument("--oracle-steps", type=int, default=1500, help="oracle optimiser steps")
    train.add_argument("--seed", type=int, default=0, help="seed of data and initialisation")
    train.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    train.add_argument("--checkpoints", type=Path, default=DEFAULT_CHECKPOINTS,
                       help="checkpoint folder; an existing checkpoint is resumed")
    train.add_argument("--out", type=Path, default=WEIGHTS_DIR,
                       help="folder for the safetensors weights and card.json")
    train.set_defaults(handler=run_train)

    evaluate = actions.add_parser("eval", help="measure oracle accuracy and model quality bars")
    evaluate.add_argument("--weights", type=Path, default=WEIGHTS_DIR,
                          help="folder holding unet.safetensors and oracle.safetensors")
    evaluate.add_argument("--per-split", type=int, default=240,
                          help="generated images per caption split")
    evaluate.add_argument("--per-task", type=int, default=60,
                          help="generated images per task prompt set (forget and retain)")
    evaluate.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    evaluate.add_argument("--grid", type=Path, default=None,
                          help="also save a PNG grid of forget and retain samples per task")
    evaluate.add_argument("--update-card", action="store_true",
                          help="write the measured numbers into card.json")
    evaluate.set_defaults(handler=run_eval)
    return parser


def run_train(args: argparse.Namespace) -> int:
    import torch

    from harness.shapes.card import update_card

    torch.set_num_threads(args.threads)
    command = (
        f"arena shapes train --part {args.part} --unet-steps {args.unet_steps} "
        f"--oracle-steps {args.oracle_steps} --seed {args.seed} --threads {args.threads}"
    )
    card: dict = {}

    if args.part in ("all", "oracle"):
        from harness.shapes.oracle import OracleTrainingConfig, train_oracle

        config = OracleTrainingConfig(steps=args.oracle_steps, seed=args.seed)
        result = train_oracle(config, args.out / "oracle.safetensors")
        card["oracle"] = {
            "training_command": command,
            "threads": args.threads,
            "config": config.__dict__,
            "train_seconds": round(result.seconds, 1),
            "fresh_render_accuracy": result.accuracy,
        }
        print(f"oracle: {result.seconds:.0f} s, accuracy on fresh renders {result.accuracy}")
        # Write the card now, so a UNet run stopped later cannot lose the oracle's entry.
        update_card(args.out / "card.json", card)

    if args.part in ("all", "unet"):
        from harness.shapes.train import UnetTrainingConfig, train_unet

        config = UnetTrainingConfig(steps=args.unet_steps, seed=args.seed)
        result = train_unet(config, args.checkpoints, args.out / "unet.safetensors")
        card["unet"] = {
            "training_command": command,
            "threads": args.threads,
            "config": config.__dict__,
            "train_seconds": round(result.seconds, 1),
            "final_loss": round(result.final_loss, 5),
        }
        print(f"UNet: {result.steps} steps, {result.seconds:.0f} s, loss {result.final_loss:.4f}")

    update_card(args.out / "card.json", card)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from harness.shapes.card import update_card
    from harness.shapes.quality import measure_quality, save_sample_grid

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = measure_quality(args.weights, per_split=args.per_split, per_task=args.per_task)
    report["eval_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))
    if args.update_card:
        update_card(args.weights / "card.json", {"measured": report})
    if args.grid:
        save_sample_grid(args.weights, args.grid)
        print(f"sample grid written to {args.grid}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m harness.shapes.cli")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_parser(subparsers)
    args = parser.parse_args(["shapes", *(argv if argv is not None else sys.argv[1:])])
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
