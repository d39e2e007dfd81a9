"""Add the training fingerprint to a checkpoint made before checkpoints carried one, without retraining.

The fingerprint (see UNet3DSegmenterLib/fingerprint.py) is computed from the training cases that the
checkpoint's split file names, exactly as ``train`` computes it; every other field of the file,
the weights included, is copied unchanged. The bundled model got its fingerprint this way::

    python docs/add_fingerprint.py --checkpoint Resources/Models/hippocampus.pt \\
        --split Resources/Models/hippocampus_split.json --data ../shared/data/msd_hippocampus \\
        --modality MRI --output hippocampus-with-fingerprint.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from UNet3DSegmenterLib.atomic import atomic_path  # noqa: E402
from UNet3DSegmenterLib.checkpoint import load_single_checkpoint  # noqa: E402
from UNet3DSegmenterLib.datalist import load_datalist  # noqa: E402
from UNet3DSegmenterLib.errors import UserError  # noqa: E402
from UNet3DSegmenterLib.training.planning import training_fingerprint  # noqa: E402
from UNet3DSegmenterLib.training.splits import read_split  # noqa: E402


def add_fingerprint(checkpoint: Path, split: Path, data: Path, modality: str | None, output: Path) -> dict:
    """Write ``checkpoint`` with the fingerprint of ``split``'s training cases to ``output``; return it."""
    if output.resolve() == checkpoint.resolve():
        raise UserError(f"--output {output} is the checkpoint read: write to another file, then move it")
    load_single_checkpoint(checkpoint, "adding a fingerprint")  # a readable, consistent checkpoint
    record = torch.load(checkpoint, map_location="cpu", weights_only=True)
    datalist = load_datalist(data)
    names = read_split(split).train
    missing = sorted(set(names) - {case.name for case in datalist.cases})
    if missing:
        raise UserError(f"case {missing[0]} of {split} is not in {data}: give the data the model was trained on")
    fingerprint = training_fingerprint(datalist.subset(names), modality or datalist.modality)
    record["fingerprint"] = fingerprint.to_dict()
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as temporary:
        torch.save(record, temporary)
    return record["fingerprint"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a one-network checkpoint (.pt)")
    parser.add_argument("--split", required=True, type=Path, help="its split.json (the 'train' list is used)")
    parser.add_argument("--data", required=True, type=Path, help="the dataset it was trained on")
    parser.add_argument("--modality", default=None, help="e.g. MRI or CT (default: the dataset's, if it says)")
    parser.add_argument("--output", required=True, type=Path, help="the checkpoint to write (not the one read)")
    args = parser.parse_args()
    try:
        fingerprint = add_fingerprint(args.checkpoint, args.split, args.data, args.modality, args.output)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {fingerprint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
