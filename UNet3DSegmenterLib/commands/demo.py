"""``unet3d-segmenter demo``: the whole tool on generated data, with nothing to download.

Generates labelled phantoms, trains a small U-Net on some of them, segments the others, prints
Dice per class and leaves the checkpoint, the training curves and an overlay picture in a folder.
Run again into the same folder, it replaces its own earlier outputs, and only those.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..choices import DEVICES
from ..errors import UserError

CLASSES = 2  # organ and lesion

# (training cases, held-out cases, phantom shape, epochs, iterations per epoch, patch size)
_SIZES = {
    "full": (16, 3, (48, 64, 64), 30, 16, (32, 64, 64)),
    "fast": (4, 1, (24, 32, 32), 2, 3, (16, 32, 32)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", type=Path, default=Path("demo-output"), help="folder for everything it makes")
    parser.add_argument("--fast", action="store_true", help="a tiny run in seconds (for tests), not a useful model")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--seed", type=int, default=0)


def _print_epoch(event: Mapping[str, Any]) -> None:
    if event.get("event") != "epoch":
        return
    dice = event.get("dice")
    scores = ", ".join(f"{name} {value:.3f}" for name, value in dice.items()) if dice else ""
    print(f"    epoch {event['epoch']}/{event['epochs']}: loss {event['train_loss']:.3f}"
          + (f", validation Dice {scores}" if scores else ""), flush=True)


def _earlier_demo(model_folder: Path, train_folder: Path) -> bool:
    """True when ``model_folder`` holds the model of an earlier demo on this very data, which a demo run again
    replaces; any other model there is kept (training refuses the folder)."""
    try:
        return json.loads((model_folder / "run.json").read_text(encoding="utf-8"))["data"] == str(train_folder.resolve())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run(args: argparse.Namespace) -> int:
    from ..inference.predictor import Predictor
    from ..io import read_volume, write_volume
    from ..metrics import segmentation_metrics
    from ..phantom import PHANTOM_LABELS, write_phantom_dataset
    from ..plots import save_overlay
    from ..training.config import TrainingConfig
    from ..training.trainer import train

    train_cases, test_cases, shape, epochs, iterations, patch_size = _SIZES["fast" if args.fast else "full"]
    output = args.output
    if output.exists() and not output.is_dir():
        raise UserError(f"{output} exists and is not a folder: choose another --output")
    started = time.perf_counter()
    print(f"1/4 generating {train_cases} training and {test_cases} held-out phantoms in {output / 'data'}")
    train_folder = write_phantom_dataset(output / "data" / "train", cases=train_cases, shape=shape,
                                         seed=args.seed, classes=CLASSES)
    test_folder = write_phantom_dataset(output / "data" / "test", cases=test_cases, shape=shape,
                                        seed=args.seed + 1, classes=CLASSES)

    print(f"2/4 training a small 3D U-Net for {epochs} epochs on {args.device}")
    config = TrainingConfig(
        data=train_folder, output=output / "model", architecture="unet3d", depth=4,
        base_width=4 if args.fast else 8, epochs=epochs, iterations_per_epoch=iterations,
        patch_size=patch_size, batch_size=2, val_every=max(1, epochs // 5), device=args.device, seed=args.seed,
        label_names={value: PHANTOM_LABELS[value][0] for value in range(1, CLASSES + 1)},
        label_colors={value: PHANTOM_LABELS[value][1] for value in range(1, CLASSES + 1)},
        overwrite=_earlier_demo(output / "model", train_folder),
    )
    result = train(config, progress=_print_epoch)

    print(f"3/4 segmenting the held-out phantoms with {result.best_checkpoint}")
    predictor = Predictor(result.best_checkpoint, device=args.device)
    names = {label.value: label.name for label in predictor.checkpoint.labels}
    dice: dict[str, list[float]] = {}
    for image_path in sorted((test_folder / "images").glob("*.nii.gz")):
        image, reference = read_volume(image_path), read_volume(test_folder / "labels" / image_path.name)
        prediction = predictor.predict(image).labelmap
        write_volume(prediction, output / "predictions" / image_path.name)
        for value, scores in segmentation_metrics(prediction, reference, labels=sorted(names)[1:]).items():
            dice.setdefault(names[value], []).append(scores["dice"])
    overlay = save_overlay(image, reference, prediction, output / "overlay.png")

    print("4/4 results on held-out phantoms (Dice per class):")
    for name, values in dice.items():
        print(f"    {name:<12} {sum(values) / len(values):.3f}")
    print(f"done in {time.perf_counter() - started:.0f} s. Everything is in {output.resolve()}:")
    for path in [result.best_checkpoint, output / "model" / "curves.png", overlay, output / "predictions"]:
        print(f"    {path}")
    return 0
