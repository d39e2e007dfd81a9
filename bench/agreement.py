"""Does the fast default (bf16 on CPUs with native bf16) give the fp32 labelmap? Checked on real cases.

Segments the validation cases of a trained model's run (its split.json) twice, with the predictor's
default precision and with fp32, and prints the fraction of voxels whose label agrees.

    python bench/agreement.py --checkpoint Resources/Models/hippocampus.pt \
        --split Resources/Models/hippocampus_split.json --images ../shared/data/msd_hippocampus/images
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from UNet3DSegmenterLib import Predictor, read_volume  # noqa: E402
from UNet3DSegmenterLib.runtime import resolve_precision  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--split", type=Path, required=True, help="split.json of the run that made the checkpoint")
    parser.add_argument("--images", type=Path, required=True, help="folder of the case images (<name>.nii.gz)")
    args = parser.parse_args()
    names = json.loads(args.split.read_text())["validation"]
    default, fp32 = (Predictor(args.checkpoint, device="cpu", precision=p) for p in ("auto", "fp32"))
    same = total = 0
    for name in names:
        volume = read_volume(args.images / f"{name}.nii.gz")
        fast, reference = default.predict(volume).labelmap.array, fp32.predict(volume).labelmap.array
        same += int((fast == reference).sum())
        total += reference.size
    print(json.dumps({"checkpoint": str(args.checkpoint), "cases": len(names),
                      "default_precision": str(resolve_precision("auto", default.device)),
                      "voxels": total, "differing_voxels": total - same, "voxel_agreement": same / total}))


if __name__ == "__main__":
    main()
