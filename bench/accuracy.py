"""Accuracy for a fixed wall-clock budget: our trainer against the MONAI tutorial recipe, same split.

Both train on the training cases of the hippocampus data (../shared/data/msd_hippocampus, split
by case with seed 0, 20% validation, as the trainer's default) for the same number of minutes
each, one after the other, then segment the same whole validation cases; Dice per class is
computed by the same code for both.

  ours:  unet3d-segmenter's trainer with its defaults (depth 4 U-Net, DiceCE, AdamW, poly schedule,
         augmentation), its epochs sized from a short timing run so that the schedule ends
         within the budget; the best checkpoint by validation Dice is evaluated.
  MONAI: the 3D segmentation tutorial recipe: monai.networks.nets.UNet (16-32-64-128-256, strides 2,
         two residual units, batch norm), DiceCELoss, Adam 1e-4, NormalizeIntensity,
         RandCropByPosNegLabel 48x64x48, batch 2, sliding_window_inference for validation.

    python bench/accuracy.py --budget-minutes 30
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from UNet3DSegmenterLib.datalist import load_datalist  # noqa: E402
from UNet3DSegmenterLib.inference.predictor import Predictor  # noqa: E402
from UNet3DSegmenterLib.io import read_volume  # noqa: E402
from UNet3DSegmenterLib.metrics import dice  # noqa: E402
from UNet3DSegmenterLib.training.splits import make_split  # noqa: E402
from UNet3DSegmenterLib.training.trainer import TrainingConfig, train  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd_hippocampus"
CLASSES = {1: "anterior", 2: "posterior"}


def validation_cases(data: Path) -> tuple[list, list]:
    cases = load_datalist(data).cases
    split = make_split([case.name for case in cases], val_fraction=0.2, seed=0)
    chosen = set(split.validation)
    return [case for case in cases if case.name not in chosen], [case for case in cases if case.name in chosen]


def mean_dice(pairs) -> dict:
    """pairs: (prediction array, reference array) per case -> mean Dice per class name."""
    return {name: round(float(np.mean([dice(p == value, r == value) for p, r in pairs])), 4)
            for value, name in CLASSES.items()}


def run_ours(data: Path, output: Path, budget: float, validation) -> dict:
    labels = dict(CLASSES)
    common = dict(data=data, output=output / "calibration", depth=4, label_names=labels, val_fraction=0.2, seed=0)
    timings = []
    train(TrainingConfig(**common, epochs=1, iterations_per_epoch=20, val_every=1000),
          progress=lambda event: timings.append(event["seconds"]) if event.get("event") == "epoch" else None)
    seconds_per_iteration = timings[-1] / 20
    iterations_per_epoch = 50
    # a validation every 5 epochs costs about as much as 10 iterations; keep 10% slack
    epochs = max(1, int(0.9 * budget / (seconds_per_iteration * (iterations_per_epoch + 2))))
    started = time.perf_counter()
    result = train(TrainingConfig(**{**common, "output": output / "ours"}, epochs=epochs,
                                  iterations_per_epoch=iterations_per_epoch, val_every=5),
                   cancel=lambda: time.perf_counter() - started > budget)
    seconds = time.perf_counter() - started
    predictor = Predictor(result.best_checkpoint, device="cpu")
    pairs = [(predictor.predict(read_volume(case.image)).labelmap.array, read_volume(case.label).array)
             for case in validation]
    return {"epochs": result.epochs_completed, "iterations": result.epochs_completed * iterations_per_epoch,
            "train_seconds": round(seconds), "stopped": result.stopped, "dice": mean_dice(pairs)}


def run_monai(train_cases, validation, budget: float) -> dict:
    from monai.data import CacheDataset, DataLoader
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        NormalizeIntensityd,
        RandCropByPosNegLabeld,
        SpatialPadd,
    )

    torch.manual_seed(0)
    roi = (48, 64, 48)
    keys = ["image", "label"]
    base = [LoadImaged(keys), EnsureChannelFirstd(keys), NormalizeIntensityd("image"), SpatialPadd(keys, roi)]
    transform = Compose(base + [RandCropByPosNegLabeld(keys, "label", roi, pos=1, neg=1, num_samples=2),
                                EnsureTyped(keys)])
    items = [{"image": str(case.image), "label": str(case.label)} for case in train_cases]
    loader = DataLoader(CacheDataset(items, transform, progress=False), batch_size=1, shuffle=True, num_workers=0)
    model = UNet(3, 1, 3, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="batch")
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    started, iterations = time.perf_counter(), 0
    while time.perf_counter() - started < budget:
        model.train()
        for batch in loader:
            loss = loss_function(model(batch["image"]), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            iterations += 1
            if time.perf_counter() - started >= budget:
                break
    seconds = time.perf_counter() - started
    model.eval()
    load = Compose([LoadImaged(keys), EnsureChannelFirstd(keys), NormalizeIntensityd("image")])
    pairs = []
    with torch.no_grad():
        for case in validation:
            item = load({"image": str(case.image), "label": str(case.label)})
            logits = sliding_window_inference(item["image"][None], roi, 4, model, overlap=0.5, mode="gaussian")
            pairs.append((logits[0].argmax(0).numpy(), np.asarray(item["label"][0])))
    return {"iterations": iterations, "train_seconds": round(seconds), "dice": mean_dice(pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=30.0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--output", type=Path, default=Path("bench-output/accuracy"))
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"error: {args.data} not found: this benchmark needs the hippocampus data there")
    budget = args.budget_minutes * 60
    train_cases, validation = validation_cases(args.data)
    report = {"budget_minutes": args.budget_minutes, "training_cases": len(train_cases),
              "validation_cases": len(validation), "torch_threads": torch.get_num_threads()}
    report["ours"] = run_ours(args.data, args.output, budget, validation)
    print(json.dumps(report["ours"]), file=sys.stderr, flush=True)
    report["monai"] = run_monai(train_cases, validation, budget)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
