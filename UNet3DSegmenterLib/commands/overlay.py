"""``unet3d-segmenter overlay``: a picture of image | reference | prediction for one case (PNG).

The same figure the demo leaves behind: axial, coronal and sagittal slices through the centre of the
labelled region, with the labels drawn over the image in their colours.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``overlay`` subcommand's options to ``parser``."""
    parser.add_argument("--image", "-i", required=True, type=Path, metavar="PATH",
                        help="the image (a volume file or a DICOM series folder)")
    parser.add_argument("--prediction", "-p", required=True, type=Path, metavar="PATH",
                        help="the predicted label map, on the image's grid")
    parser.add_argument("--reference", "-r", type=Path, metavar="PATH",
                        help="the reference (ground-truth) label map, on the image's grid (optional)")
    parser.add_argument("--output", "-o", required=True, type=Path, metavar="PNG", help="the picture to write (.png)")
    parser.add_argument("--checkpoint", "-c", type=Path, metavar="CKPT",
                        help="draw the labels in this checkpoint's colours (default: a fixed palette)")


def run(args: argparse.Namespace) -> int:
    """Read the volumes, check that they share the image's grid, and draw the picture."""
    from ..io import read_volume
    from ..metrics import check_label_map
    from ..paths import check_outputs
    from ..plots import save_overlay

    if args.output.suffix.lower() != ".png":
        raise UserError(f"{args.output}: the overlay is a PNG picture; give an output file ending in .png")
    if args.output.is_dir():
        raise UserError(f"{args.output} is a folder: give the picture's file name, e.g. {args.output / 'overlay.png'}")
    check_outputs([args.output], [args.image, args.prediction, args.reference, args.checkpoint])
    image = read_volume(args.image)
    labelmaps = {}
    for role, path in (("prediction", args.prediction), ("reference", args.reference)):
        if path is None:
            continue
        labels = read_volume(path)
        check_label_map(labels, str(path))
        if not labels.same_grid(image, tolerance=1e-3):
            raise UserError(f"the {role} {path} ({labels.describe_grid_beside(image)}) is not on the grid of the "
                            f"image {args.image} ({image.describe_grid_beside(labels)}): give the label map made for this image")
        labelmaps[role] = labels
    colors = _checkpoint_colors(args.checkpoint) if args.checkpoint else None
    path = save_overlay(image, labelmaps.get("reference"), labelmaps["prediction"], args.output, colors)
    print(f"wrote {path}")
    return 0


def _checkpoint_colors(path: Path) -> dict[int, tuple[float, float, float]]:
    from ..checkpoint import load_checkpoint

    return {label.value: label.color for label in load_checkpoint(path).labels}
