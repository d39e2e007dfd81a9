"""Make the tiny nnU-Net v2 model fixture of the test suite, with nnU-Net's own predictions beside it.

Run once, in the bench environment (nnunetv2 installed), with the machine to itself::

    .venv-bench/bin/python bench/nnunet_fixture.py

What it does, all with nnU-Net's own code, driven in-process (its command-line tools import every
trainer, and through timm a torchvision that does not load beside the CPU build of torch):

1. A raw dataset of 8 hippocampus cases from ../shared/data/msd_hippocampus with two channels: the
   MRI named "MRI" (z-score normalisation) and the same image again named "CT" (nnU-Net then plans
   its CT normalisation for it, with the percentiles, mean and std of its fingerprint).
2. nnU-Net's fingerprint and default planner; then the 3d_fullres plans are edited to make the model
   tiny and to exercise every step of nnU-Net's pre- and postprocessing: three stages of 4, 8, 16
   features, patch 8 x 40 x 32, batch 2, a transposition of the axes (x, z, y) and a target spacing
   of 4 x 1.25 x 1.25 mm (anisotropic: the images are resampled with a separate z axis, and the
   probabilities back). A second plans file is the same with nnU-Net's residual-encoder U-Net.
3. nnU-Net's preprocessing, then its trainer (a subclass here that only shortens training to 2
   epochs of 4 iterations, and allows mirroring on axes 1 and 2 only, as some trainers do): the plain
   U-Net on folds 0 and 1, the residual-encoder U-Net on fold 0.
4. nnU-Net's predictor (nnUNetPredictor) segments two cases that no fold trained on, and writes its
   labelmaps: plain fold 0 with and without mirroring, plain folds 0+1 (its ensemble), ResEnc fold 0.

The result folders are copied to Testing/Python/engine/data/nnunet/ keeping dataset.json,
plans.json and fold_*/checkpoint_final.pth as nnU-Net wrote them (fold 0 of the plain U-Net whole;
the other checkpoints without their optimiser state, to keep the fixture small). The input images
are not copied: the tests read them from ../shared/data and skip where it is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "msd_hippocampus"
FIXTURE = ROOT / "Testing" / "Python" / "engine" / "data" / "nnunet"
DATASET_ID, DATASET = 904, "Dataset904_TinyHippocampus"
TRAINING_CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006", "hippocampus_007",
                  "hippocampus_008", "hippocampus_011", "hippocampus_015"]
PREDICTED_CASES = ["hippocampus_017", "hippocampus_019"]
CPU = torch.device("cpu")


def write_raw_dataset(folder: Path) -> None:
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case in TRAINING_CASES:
        for channel in ("0000", "0001"):
            (folder / "imagesTr" / f"{case}_{channel}.nii.gz").symlink_to(DATA / "images" / f"{case}.nii.gz")
        label = sitk.Cast(sitk.ReadImage(str(DATA / "labels" / f"{case}.nii.gz")), sitk.sitkUInt8)
        sitk.WriteImage(label, str(folder / "labelsTr" / f"{case}.nii.gz"))
    dataset = {"channel_names": {"0": "MRI", "1": "CT"}, "labels": {"background": 0, "anterior": 1, "posterior": 2},
               "numTraining": len(TRAINING_CASES), "file_ending": ".nii.gz", "licence": "CC-BY-SA 4.0",
               "name": "TinyHippocampus", "description": "test fixture: a tiny model, not for use"}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))


def tiny_plans(plans: dict) -> tuple[dict, dict]:
    """The planner's plans made tiny and anisotropic: (plain U-Net plans, residual-encoder plans)."""
    plans["transpose_forward"], plans["transpose_backward"] = [2, 0, 1], [1, 2, 0]
    configuration = plans["configurations"]["3d_fullres"]
    configuration.update(spacing=[4.0, 1.25, 1.25], patch_size=[8, 40, 32], batch_size=2)
    arguments = configuration["architecture"]["arch_kwargs"]
    arguments.update(n_stages=3, features_per_stage=[4, 8, 16], kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
                     strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]], n_conv_per_stage=[2, 2, 2],
                     n_conv_per_stage_decoder=[2, 2])
    plans["configurations"] = {"3d_fullres": configuration}
    resenc = json.loads(json.dumps(plans))
    resenc["plans_name"] = "nnUNetResEncPlans"
    network = resenc["configurations"]["3d_fullres"]["architecture"]
    network["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    network["arch_kwargs"]["n_blocks_per_stage"] = network["arch_kwargs"].pop("n_conv_per_stage")
    network["arch_kwargs"]["n_blocks_per_stage"] = [1, 1, 1]
    network["arch_kwargs"]["n_conv_per_stage_decoder"] = [1, 1]
    return plans, resenc


def trainer_class(epochs: int = 2, iterations: int = 4, mirror_axes: tuple[int, ...] | None = (1, 2)):
    """nnU-Net's trainer shortened to ``epochs`` of ``iterations``, mirroring only on ``mirror_axes`` (None:
    nnU-Net's own choice). Its name names the result folder."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerTiny(nnUNetTrainer):
        # nnU-Net records its constructor's arguments by name: keep its signature
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = CPU):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = epochs
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = 1

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
            rotation, dummy_2d, patch_size, axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            if mirror_axes is not None:
                self.inference_allowed_mirroring_axes = axes = mirror_axes
            return rotation, dummy_2d, patch_size, axes

    return nnUNetTrainerTiny


def train(plans: dict, fold: int, dataset_json: dict):
    trainer = trainer_class()(plans={**plans, "continue_training": False}, configuration="3d_fullres", fold=fold, dataset_json=dataset_json,
                              device=CPU)
    trainer.run_training()
    return trainer


def predict(trainers: list, images: list[list[str]], output: Path, mirroring: bool) -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    first = trainers[0]
    first.set_deep_supervision_enabled(False)
    first.network.eval()
    weights = [torch.load(Path(trainer.output_folder) / "checkpoint_final.pth", map_location=CPU,
                          weights_only=False)["network_weights"] for trainer in trainers]
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=CPU, allow_tqdm=False)
    predictor.manual_initialization(first.network, first.plans_manager, first.configuration_manager, weights,
                                    first.dataset_json, type(first).__name__, first.inference_allowed_mirroring_axes)
    output.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files(images, [str(output / case) for case in PREDICTED_CASES],
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)


def copy_result(source: Path, target: Path, folds: list[int], whole: set[int]) -> None:
    target.mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy(source / name, target / name)
    for fold in folds:
        (target / f"fold_{fold}").mkdir()
        checkpoint = source / f"fold_{fold}" / "checkpoint_final.pth"
        if fold in whole:
            shutil.copy(checkpoint, target / f"fold_{fold}" / "checkpoint_final.pth")
        else:
            record = torch.load(checkpoint, map_location=CPU, weights_only=False)
            record["optimizer_state"] = None
            torch.save(record, target / f"fold_{fold}" / "checkpoint_final.pth")


def main() -> None:
    if not DATA.is_dir():
        sys.exit(f"{DATA} is missing: the fixture is made from the hippocampus data")
    work = Path(tempfile.mkdtemp(prefix="nnunet-fixture-"))
    paths = {name: work / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    os.environ.update({name: str(path) for name, path in paths.items()})
    os.environ.update(nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1", nnUNet_compile="false")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    raw = paths["nnUNet_raw"] / DATASET
    write_raw_dataset(raw)
    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True)
    plan_experiments([DATASET_ID])
    preprocessed = paths["nnUNet_preprocessed"] / DATASET
    plain, resenc = tiny_plans(json.loads((preprocessed / "nnUNetPlans.json").read_text()))
    (preprocessed / "nnUNetPlans.json").write_text(json.dumps(plain, indent=2))
    (preprocessed / "nnUNetResEncPlans.json").write_text(json.dumps(resenc, indent=2))
    preprocess([DATASET_ID], "nnUNetPlans", configurations=("3d_fullres",), num_processes=(1,))
    dataset_json = json.loads((raw / "dataset.json").read_text())

    plain_folds = [train(plain, fold, dataset_json) for fold in (0, 1)]
    resenc_fold = train(resenc, 0, dataset_json)

    shutil.rmtree(FIXTURE, ignore_errors=True)
    images = [[str(DATA / "images" / f"{case}.nii.gz")] * 2 for case in PREDICTED_CASES]
    predictions = FIXTURE / "predictions"
    predict(plain_folds[:1], images, predictions / "plain_fold0_mirrored", mirroring=True)
    predict(plain_folds[:1], images, predictions / "plain_fold0", mirroring=False)
    predict(plain_folds, images, predictions / "plain_folds01", mirroring=False)
    predict([resenc_fold], images, predictions / "resenc_fold0_mirrored", mirroring=True)
    for folder in predictions.iterdir():
        for extra in folder.glob("*.json"):
            extra.unlink()
    results = paths["nnUNet_results"] / DATASET
    copy_result(results / "nnUNetTrainerTiny__nnUNetPlans__3d_fullres",
                FIXTURE / "nnUNetTrainerTiny__nnUNetPlans__3d_fullres", [0, 1], whole={0})
    copy_result(results / "nnUNetTrainerTiny__nnUNetResEncPlans__3d_fullres",
                FIXTURE / "nnUNetTrainerTiny__nnUNetResEncPlans__3d_fullres", [0], whole=set())
    shutil.rmtree(work)
    print(json.dumps({"fixture": str(FIXTURE.relative_to(ROOT)), "cases": PREDICTED_CASES}))


if __name__ == "__main__":
    main()
