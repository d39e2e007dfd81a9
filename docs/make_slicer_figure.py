"""Render docs/images/slicer-segmentation.png: a segmentation by the Slicer module, in Slicer's own views.

The module's Logic runs on Slicer's real MRML core (the slicer-core wheel, through the headless harness
in Testing/Python/slicer): the volume is added to a scene and segmented with a checkpoint into a
segmentation node, as a user gets it. Slicer's own slice and 3D views (slice logics and displayable
managers, see UNet3DSegmenterLib/slicer/views.py) then render that scene offscreen in the Four-Up
layout: axial and 3D on top, sagittal and coronal below.

    python docs/make_slicer_figure.py --checkpoint Resources/Models/hippocampus.pt \\
        --input ../shared/data/msd_hippocampus/images/hippocampus_011.nii.gz
    python docs/make_slicer_figure.py --checkpoint demo-output/model/best.pt      # a generated phantom
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY), str(REPOSITORY / "Testing" / "Python" / "slicer")]

from UNet3DSegmenterLib.errors import UserError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="the checkpoint to segment with")
    parser.add_argument("--input", type=Path, default=None,
                        help="a volume file to segment (default: a generated phantom, for a phantom model)")
    parser.add_argument("--seed", type=int, default=4242, help="phantom seed (one the model never saw)")
    parser.add_argument("--size", type=int, default=320, help="width and height of each view in pixels")
    parser.add_argument("--output", type=Path, default=REPOSITORY / "docs" / "images" / "slicer-segmentation.png")
    args = parser.parse_args()
    try:
        return _render(args)
    except (UserError, ValueError, OSError) as error:  # the engine's and the Logic's errors for bad input
        print(f"error: {error}", file=sys.stderr)
        return 2


def _render(args: argparse.Namespace) -> int:
    from UNet3DSegmenterLib.slicer import views

    if args.size < 16:
        raise ValueError(f"--size {args.size} is too small for a view: give 16 pixels or more")
    problem = views.renderingProblem()
    if problem:
        raise ValueError(problem)

    from slicer_harness import SlicerHarness

    from UNet3DSegmenterLib.io import case_name, read_volume
    from UNet3DSegmenterLib.phantom import make_phantom

    harness = SlicerHarness()
    module = harness.install()
    try:
        logic = module.UNet3DSegmenterLogic()
        if args.input is None:
            image, _ = make_phantom(shape=(48, 64, 64), spacing=(1.0, 1.0, 2.0), seed=args.seed, classes=2)
        else:
            image = read_volume(args.input)
        volumeNode = logic.addVolumeNode(image, "phantom MRI" if args.input is None else case_name(args.input))
        print(f"segmenting {volumeNode.GetName()} with {args.checkpoint.name} ...", flush=True)
        segmentationNode = logic.segment(volumeNode, args.checkpoint, device="cpu")
        print("rendering Slicer's slice and 3D views ...", flush=True)
        picture = views.renderFourUp(volumeNode, segmentationNode, size=args.size,
                                     applicationLogic=harness.applicationLogic)
        views.writePng(picture, args.output)
    finally:
        harness.uninstall()
    print(f"wrote {args.output} ({picture.shape[1]} x {picture.shape[0]} pixels, "
          f"{args.output.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
