"""Score every fold of a cross-validation on its own validation cases, with and without mirroring TTA.

`train --folds K` already writes `cv_report.json` (each fold's best.pt on its validation cases,
plain inference). This adds the same scores with mirroring test-time augmentation (the eight axis
flips averaged, as nnU-Net validates) and the time per case, so that the two can be put side by side:

    .venv/bin/python bench/score_folds.py runs/hippocampus-cv --data ../shared/data/msd_hippocampus

Prints one JSON object: per fold and on average, Dice per class for each setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from UNet3DSegmenterLib import Predictor, read_volume  # noqa: E402
from UNet3DSegmenterLib.datalist import load_datalist  # noqa: E402
from UNet3DSegmenterLib.metrics import dice  # noqa: E402


def score(checkpoint: Path, cases, tta: bool) -> tuple[dict[str, list[float]], float]:
    """Dice per foreground class name and case, and seconds per case."""
    predictor = Predictor(checkpoint, device="cpu", tta=tta)
    labels = predictor.checkpoint.foreground_labels
    scores: dict[str, list[float]] = {label.name: [] for label in labels}
    started = time.perf_counter()
    for case in cases:
        prediction = predictor.predict(read_volume(case.image)).labelmap.array
        reference = read_volume(case.label).array
        for label in labels:
            scores[label.name].append(dice(prediction == label.value, reference == label.value))
    seconds = (time.perf_counter() - started) / max(len(cases), 1)
    return scores, round(seconds, 3)


def _means(scores: dict[str, list[float]]) -> dict[str, float]:
    return {name: round(float(np.mean(values)), 4) for name, values in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the output folder of train --folds K")
    parser.add_argument("--data", type=Path, required=True, help="the training data of that run")
    args = parser.parse_args()
    datalist = load_datalist(args.data)
    folds = sorted(args.run.glob("fold_*"), key=lambda path: int(path.name.split("_")[1]))
    result: dict = {"run": str(args.run), "folds": {}}
    pooled: dict[str, dict[str, list[float]]] = {"plain": {}, "tta": {}}
    for fold in folds:
        names = json.loads((fold / "split.json").read_text())["validation"]
        cases = datalist.subset(names)
        entry: dict = {"cases": len(cases)}
        for setting, tta in (("plain", False), ("tta", True)):
            scores, entry[f"{setting}_seconds_per_case"] = score(fold / "best.pt", cases, tta)
            entry[setting] = _means(scores)
            for name, values in scores.items():
                pooled[setting].setdefault(name, []).extend(values)
        result["folds"][fold.name] = entry
        print(json.dumps({fold.name: entry}), file=sys.stderr, flush=True)
    for setting, scores in pooled.items():  # every case once: the cross-validation's mean over all cases
        result[f"all_cases_{setting}"] = _means(scores)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
