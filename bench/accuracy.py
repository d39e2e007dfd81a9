"""Accuracy for a fixed wall-clock budget: our trainer, MONAI's tutorial recipe and nnU-Net v2, same split.

All three train on the training cases of the hippocampus data (../shared/data/msd_hippocampus,
split by case with seed 0, 20% validation, as the trainer's default) for the same number of
minutes each, one after the other, then segment the same whole validation cases; Dice per class
is computed by the same code (``mean_dice``) for all, against the same label files.

  ours:  unet3d-segmenter's trainer with its defaults (depth 4 U-Net, DiceCE, AdamW, poly schedule,
         augmentation) and deep supervision, as the bundled model is trained; its epochs sized from a
         short timing run (not counted) so that the schedule ends within the budget; the best
         checkpoint by validation Dice is evaluated.
  MONAI: the 3D segmentation tutorial recipe: monai.networks.nets.UNet (16-32-64-128-256, strides 2,
         two residual units, batch norm), DiceCELoss, Adam 1e-4, NormalizeIntensity,
         RandCropByPosNegLabel 48x64x48, batch 2, sliding_window_inference for validation.
  nnU-Net: nnunetv2 (the version pinned in the bench extra) on the CPU, as it comes but for the
         length of training. The split's cases become a raw dataset under OUTPUT/nnunet
         (Dataset004_Hippocampus: dataset.json with channel "MRI" and the two labels,
         imagesTr/<case>_0000.nii.gz linked to the data, labelsTr/<case>.nii.gz as integers); its own
         fingerprint (with its integrity check), planning (default planner, nnUNetPlans) and
         3d_fullres preprocessing run there; splits_final.json holds exactly our split, so fold 0
         trains on our training cases and never sees our validation cases (the fingerprint does
         read them, for sizes and spacings, as nnU-Net reads every case of imagesTr). Training is
         nnU-Net's trainer (its planned network, batch and patch size, Dice+CE with deep
         supervision, SGD with Nesterov momentum, poly learning rate, its augmentation) in a
         subclass defined here that changes only the length. Its epochs are 10 iterations (and 2
         validation iterations, nnU-Net's 5:1) rather than 250, because on a CPU one epoch of 250
         would take a large part of the budget; an epoch is only nnU-Net's unit of schedule and
         logging. After every epoch the number of epochs, which is where the poly schedule ends,
         is fitted again to the time left and the mean epoch time so far, so that the schedule
         ends with the budget whatever the load; no epoch starts that would not end in time, but
         one always runs. The final weights (nnU-Net's checkpoint_final, which its own inference
         uses) segment the raw validation images through nnU-Net's predictor with its defaults
         (step 0.5, Gaussian weighting, mirroring), which writes them back on the input grids.

Budget: everything before inference counts: for nnU-Net the conversion, fingerprint, planning,
preprocessing and training; for ours its case preparation and training (its timing run does not
count); for MONAI its training loop (its cases are cached before the clock starts). Inference
counts for no side. The report gives the time of each of nnU-Net's phases.

Threads: every side computes with ``--threads`` PyTorch threads (default 1, as in the recorded
runs) and prepares patches in at most one process beside it: our trainer's loader worker (its
default on 2 cores) and nnU-Net's augmentation worker (nnUNet_n_proc_DA=1; its validation
patches come from a second worker that is idle once it has filled its queue). MONAI's recipe
loads in the training process (num_workers=0). nnU-Net's fingerprint and preprocessing use one
process per core (``--processes``), as ``nnUNetv2_plan_and_preprocess -np`` does; on the CPU
nnU-Net trains in float32 (it turns autocast off there) and does not compile.

The 30-minute run takes about 95 minutes (three sides, one after the other): run it alone on the
machine, in the bench environment:

    make bench-accuracy        # .venv-bench/bin/python bench/accuracy.py --budget-minutes 30

A short check of one side: --sides nnunet --budget-minutes 3 --validation-cases 3.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
SIDES = ("ours", "monai", "nnunet")
NNUNET_DATASET_ID = 4
NNUNET_DATASET = "Dataset004_Hippocampus"
CPU = torch.device("cpu")


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
    # overwrite: the benchmark's own folders, whose models a run of it again replaces
    common = dict(data=data, output=output / "calibration", depth=4, label_names=labels, val_fraction=0.2, seed=0,
                  deep_supervision=True, overwrite=True)
    timings = []
    # three short epochs: the first pays for warming up and the last for the closing validation, so the
    # middle one is the pace of the run
    train(TrainingConfig(**common, epochs=3, iterations_per_epoch=20, val_every=1000),
          progress=lambda event: timings.append(event["seconds"]) if event.get("event") == "epoch" else None)
    seconds_per_iteration = timings[1] / 20
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


def run_nnunet(train_cases, validation, scored, work: Path, budget: float, processes: int) -> dict:
    """nnU-Net v2 from its raw dataset to segmentations of ``scored``; see the module docstring."""
    shutil.rmtree(work, ignore_errors=True)
    paths = {name: work / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    # read when nnunetv2 is imported: set them first
    os.environ.update({name: str(path) for name, path in paths.items()})
    os.environ.update(nnUNet_n_proc_DA="1", nnUNet_def_n_proc=str(processes), nnUNet_compile="false")
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    started = time.perf_counter()
    with _stdout_to_stderr():
        raw = _write_nnunet_dataset(paths["nnUNet_raw"] / NNUNET_DATASET, train_cases + validation)
        extract_fingerprints([NNUNET_DATASET_ID], num_processes=processes, check_dataset_integrity=True)
        plans_name = plan_experiments([NNUNET_DATASET_ID])
        preprocess([NNUNET_DATASET_ID], plans_name, configurations=("3d_fullres",), num_processes=(processes,))
        preprocessed = paths["nnUNet_preprocessed"] / NNUNET_DATASET
        split = [{"train": [case.name for case in train_cases], "val": [case.name for case in validation]}]
        (preprocessed / "splits_final.json").write_text(json.dumps(split, indent=2))
        planning_seconds = time.perf_counter() - started

        trainer = _budget_trainer_class()(
            plans={**json.loads((preprocessed / f"{plans_name}.json").read_text()), "continue_training": False},
            configuration="3d_fullres", fold=0, dataset_json=json.loads((raw / "dataset.json").read_text()),
            device=CPU)
        trainer.deadline = started + budget
        trainer.run_training()
        training_seconds = time.perf_counter() - started - planning_seconds
        inference_started = time.perf_counter()
        predictions = _nnunet_predict(trainer, [raw / "imagesTr" / f"{case.name}_0000.nii.gz" for case in scored],
                                      work / "predictions")
    pairs = [(read_volume(prediction).array, read_volume(case.label).array)
             for prediction, case in zip(predictions, scored)]
    inference_seconds = time.perf_counter() - inference_started
    iterations = trainer.current_epoch * trainer.num_iterations_per_epoch
    return {"epochs": trainer.current_epoch, "iterations": iterations, "patches": iterations * trainer.batch_size,
            "batch_size": trainer.batch_size, "patch_size": list(trainer.configuration_manager.patch_size),
            "planning_seconds": round(planning_seconds), "train_seconds": round(training_seconds),
            "budget_seconds_used": round(planning_seconds + training_seconds),
            "inference_seconds": round(inference_seconds), "dice": mean_dice(pairs)}


def _write_nnunet_dataset(folder: Path, cases) -> Path:
    """An nnU-Net raw dataset of ``cases``: images linked, labels written as integers (two of the
    hippocampus label files are stored as float32)."""
    import SimpleITK as sitk

    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case in cases:
        (folder / "imagesTr" / f"{case.name}_0000.nii.gz").symlink_to(case.image.resolve())
        label = sitk.Cast(sitk.ReadImage(str(case.label)), sitk.sitkUInt8)
        sitk.WriteImage(label, str(folder / "labelsTr" / f"{case.name}.nii.gz"))
    labels = {"background": 0, **{name: value for value, name in CLASSES.items()}}
    dataset = {"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": len(cases), "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return folder


def _budget_trainer_class():
    """nnU-Net's trainer whose schedule is re-fitted after every epoch to end at ``deadline``."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerBudget(nnUNetTrainer):
        deadline = float("inf")  # time.perf_counter() at which the budget is spent

        # nnU-Net records its constructor's arguments by name: keep its signature
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = CPU):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch = 10
            self.num_val_iterations_per_epoch = 2

        def run_training(self) -> None:
            self.on_train_start()
            epoch_seconds: list[float] = []
            while self.current_epoch < self.num_epochs:
                started = time.perf_counter()
                self._run_epoch()
                epoch_seconds.append(time.perf_counter() - started)
                mean = sum(epoch_seconds) / len(epoch_seconds)
                remaining_epochs = max(0, int((self.deadline - time.perf_counter()) / mean))
                self.num_epochs = self.lr_scheduler.max_steps = self.current_epoch + remaining_epochs
            self.on_train_end()

        def _run_epoch(self) -> None:
            self.on_epoch_start()
            self.on_train_epoch_start()
            self.on_train_epoch_end([self.train_step(next(self.dataloader_train))
                                     for _ in range(self.num_iterations_per_epoch)])
            with torch.no_grad():
                self.on_validation_epoch_start()
                self.on_validation_epoch_end([self.validation_step(next(self.dataloader_val))
                                              for _ in range(self.num_val_iterations_per_epoch)])
            self.on_epoch_end()

    return nnUNetTrainerBudget


def _nnunet_predict(trainer, images: list[Path], output: Path) -> list[Path]:
    """Segment ``images`` with the trained network through nnU-Net's predictor, as nnU-Net's own
    final validation does; returns the written labelmaps, on the images' grids."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=CPU, allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                                    [trainer.network.state_dict()], trainer.dataset_json, type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)
    names = [image.name.removesuffix("_0000.nii.gz") for image in images]
    predictor.predict_from_files([[str(image)] for image in images], [str(output / name) for name in names],
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)
    return [output / f"{name}.nii.gz" for name in names]


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what nnU-Net prints (from this process and its workers) to stderr: stdout carries the report."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=30.0,
                        help="wall-clock minutes per side for everything before inference (default 30)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="which sides to run (default all)")
    parser.add_argument("--validation-cases", type=int, default=None,
                        help="score only the first N validation cases (the split, and so training, stays the same)")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch compute threads for every side (default 1)")
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes for nnU-Net's fingerprint and preprocessing (default: one per core)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--output", type=Path, default=Path("bench-output/accuracy"))
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"error: {args.data} not found: this benchmark needs the hippocampus data there")
    for option in ("budget_minutes", "validation_cases", "threads", "processes"):
        value = getattr(args, option)
        if value is not None and value <= 0:
            sys.exit(f"error: --{option.replace('_', '-')} must be positive, got {value}")
    missing = [package for side, package in (("monai", "monai"), ("nnunet", "nnunetv2"))
               if side in args.sides and importlib.util.find_spec(package) is None]
    if missing:
        sys.exit(f"error: {' and '.join(missing)} not installed in {sys.prefix}: run this benchmark in the bench "
                 "environment (make bench-venv, then .venv-bench/bin/python bench/accuracy.py)")
    # the same for every side and, through the environment, for the processes nnU-Net starts
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    budget = args.budget_minutes * 60
    train_cases, validation = validation_cases(args.data)
    scored = validation[:args.validation_cases]
    report = {"budget_minutes": args.budget_minutes, "training_cases": len(train_cases),
              "validation_cases": len(scored), "torch_threads": torch.get_num_threads()}
    runs = {"ours": lambda: run_ours(args.data, args.output, budget, scored),
            "monai": lambda: run_monai(train_cases, scored, budget),
            "nnunet": lambda: run_nnunet(train_cases, validation, scored, args.output.resolve() / "nnunet", budget,
                                         args.processes)}
    for side in args.sides:
        report[side] = runs[side]()
        print(json.dumps({side: report[side]}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
