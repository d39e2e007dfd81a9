"""Render docs/images/slicer-segmentation.png from a segmentation made by the Slicer module.

The module's Logic runs on Slicer's real MRML core (the slicer-core wheel, through the headless harness
of Testing/Python): a phantom volume is added to a scene, segmented with a checkpoint into a
segmentation node, and the segments are read back from that node on the volume's grid. The picture
shows three slices of the input with those segments drawn in their own names and colours.

    python docs/make_slicer_figure.py --checkpoint Resources/Models/hippocampus.pt --input CASE.nii.gz
    python docs/make_slicer_figure.py --checkpoint demo-output/model/best.pt      # a generated phantom
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY), str(REPOSITORY / "Testing" / "Python")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="the checkpoint to segment with")
    parser.add_argument("--input", type=Path, default=None,
                        help="a volume file to segment (default: a generated phantom, for a phantom model)")
    parser.add_argument("--seed", type=int, default=4242, help="phantom seed (one the model never saw)")
    parser.add_argument("--output", type=Path, default=REPOSITORY / "docs" / "images" / "slicer-segmentation.png")
    args = parser.parse_args()

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
        segmentationNode = logic.segment(volumeNode, args.checkpoint, device="cpu")
        names = logic.segmentNames(segmentationNode)
        colors = [segmentationNode.GetSegmentation().GetSegment(segmentationNode.GetSegmentation()
                                                                .GetSegmentIdBySegmentName(name)).GetColor()
                  for name in names]
        labels = logic.labelmapFromSegmentation(segmentationNode, volumeNode, names)
        voxels = logic.volumeFromNode(volumeNode)
        _render(voxels.array, voxels.spacing, labels, names, colors, segmentationNode.GetName(), args.output)
    finally:
        harness.uninstall()
    print(f"wrote {args.output}")
    return 0


def _render(array, spacing, labels, names, colors, title, output: Path) -> None:
    # slices through the smallest segment found, so that every segment shows
    present = [value for value in range(len(names), 0, -1) if np.any(labels == value)]
    inside = np.argwhere(labels == present[0]) if present else np.argwhere(np.ones(labels.shape, bool))
    k, j, i = inside.mean(axis=0).round().astype(int)
    sx, sy, sz = spacing
    views = [("axial", array[k], labels[k], sy / sx), ("coronal", array[:, j, :][::-1], labels[:, j, :][::-1], sz / sx),
             ("sagittal", array[:, :, i][::-1], labels[:, :, i][::-1], sz / sy)]
    low, high = np.percentile(array, [1, 99.5])
    figure, axes = plt.subplots(1, 3, figsize=(10.5, 4.0), facecolor="black")
    for axis, (name, picture, segments, aspect) in zip(axes, views):
        axis.imshow(picture, cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="bilinear")
        overlay = np.zeros(segments.shape + (4,))
        for value, color in enumerate(colors, start=1):
            overlay[segments == value] = (*color, 0.5)
        axis.imshow(overlay, aspect=aspect, interpolation="nearest")
        for value, color in enumerate(colors, start=1):
            if np.any(segments == value):
                axis.contour(segments == value, levels=[0.5], colors=[color], linewidths=1.2)
        axis.set_title(name, color="white", fontsize=11)
        axis.axis("off")
    present = [(name, color) for value, (name, color) in enumerate(zip(names, colors), start=1) if np.any(labels == value)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=color) for _, color in present]
    figure.legend(handles, [name for name, _ in present], loc="lower center", ncol=max(len(present), 1), frameon=False,
                  labelcolor="white", fontsize=10)
    figure.suptitle(f"UNet3DSegmenter in Slicer: {title}", color="white", fontsize=12)
    figure.tight_layout(rect=(0, 0.07, 1, 0.95))
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110, facecolor="black")


if __name__ == "__main__":
    sys.exit(main())
