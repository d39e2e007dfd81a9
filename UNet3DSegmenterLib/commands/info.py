"""``unet3d-segmenter info``: what a checkpoint is, in words (network, labels, preprocessing, training)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, nargs="+",
                        help="model checkpoint (.pt); an ensemble file, a folder of fold checkpoints or several "
                             "checkpoints are described as one ensemble")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint

    print(load_checkpoint(args.checkpoint).describe())
    return 0
