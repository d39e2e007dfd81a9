"""``unet3d-segmenter ensemble``: join checkpoints (e.g. the folds of a cross-validation) into one file.

The file is an ensemble checkpoint (see :mod:`UNet3DSegmenterLib.checkpoint`): ``predict``, ``info``
and the Slicer module take it wherever they take a checkpoint, and predictions average the softmax
probabilities of its networks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", type=Path, nargs="+", metavar="CHECKPOINT",
                        help="checkpoints (.pt), ensemble files, or folders of them (a cross-validation's output "
                             "stands for its folds' best.pt)")
    parser.add_argument("--output", "-o", required=True, type=Path, help="the ensemble file to write (.pt)")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import checkpoint_paths, load_ensemble, save_checkpoint
    from ..paths import check_outputs

    output: Path = args.output
    if output.suffix != ".pt" or output.is_dir():
        raise UserError(f"--output {output}: give a file name ending in .pt")
    check_outputs([output], checkpoint_paths(args.checkpoints))
    ensemble = load_ensemble(args.checkpoints)
    ensemble.training = {"from": ", ".join(str(path) for path in args.checkpoints)}
    try:
        save_checkpoint(ensemble, output)
    except OSError as error:
        raise UserError(f"cannot write {output}: {error.strerror or error}") from None
    print(f"wrote {output}: an ensemble of {len(ensemble.members)} networks", file=sys.stderr)
    return 0
