"""nnU-Net models in this engine against nnU-Net's own predictor: agreement, Dice, speed and peak memory.

Three models are trained by nnU-Net 2.8.1 itself (driven in-process, as bench/accuracy.py does; its
command-line tools import every trainer, and through timm a torchvision that does not load beside
the CPU build of torch), briefly (``--iterations``, batch 2), on ../shared/data:

  mri:   msd_hippocampus, channel "MRI" (z-score), 20 training cases, its default plans; scored on 5
         cases that it did not train on.
  ct:    totalsegmentator_example_ct, channel "CT" (nnU-Net's CT normalisation), 5 of its labels (spleen,
         kidneys, liver, aorta); the plans' spacing set to 2.5 mm (the image is 3 mm: resampled there and
         back) and its features halved; trained and scored on the one case (fold "all").
  aniso: pyradiomics_brain_tumor, 0.78 x 0.78 x 6.5 mm MRI, two labels: the head (from the image, see
         source_labels: the tumours are a few hundred to a few thousand voxels, which minutes of
         training do not find) and the tumour; the plans' spacing set to 5 x 1 x 1 mm so that
         both cases are resampled with a separate z axis there and back; features halved and the patch
         24 x 128 x 128 (the plans' 24 x 256 x 256 trains too slowly on a CPU); trained and scored on
         both cases (fold "all"), so more windows than one per case.

Then, for each model and each setting (mirroring off and on), each side segments the scored cases in a
child process of its own, one case at a time from the file to the labelmap on the input grid: nnU-Net's
``nnUNetPredictor.predict_single_npy_array`` (float32, its defaults: step 0.5, Gaussian) and this engine's
``Predictor`` (its fast CPU path; float32 where agreement is measured, and bf16: without mirroring
only, unless the CPU has native bf16, where bf16 is the engine's default and its speed the one that
counts). Every case runs once to warm up (the engine measures its fastest path once per network and
machine, and keeps it), then the second pass is timed; the child's peak resident memory is reported.
Agreement is the fraction of equal voxels per case; Dice per class against the dataset's labels for
both sides.

    .venv-bench/bin/python bench/nnunet_agreement.py --output /tmp/nnunet-bench
    # as an AVX2-only CPU would run it:
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 ... --skip-training --models mri
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MODELS = {
    "mri": {"id": 911, "data": "msd_hippocampus", "channel": "MRI", "labels": {"anterior": [1], "posterior": [2]},
            "train": 20, "score": 5, "fold": 0, "spacing": None, "halve": False},
    "ct": {"id": 912, "data": "totalsegmentator_example_ct", "channel": "CT",
           "labels": {"spleen": [1], "kidney_right": [2], "kidney_left": [3], "liver": [5], "aorta": [52]},
           "train": 1, "score": 1, "fold": "all", "spacing": [2.5, 2.5, 2.5], "halve": True},
    "aniso": {"id": 913, "data": "pyradiomics_brain_tumor", "channel": "MRI", "labels": {"head": [1], "tumour": [2]},
              "head": True, "train": 2, "score": 2, "fold": "all", "spacing": [5.0, 1.0, 1.0], "halve": True,
              "patch": [24, 128, 128]},
}


def cases(model: dict) -> tuple[list[Path], list[Path]]:
    images = sorted((DATA / model["data"] / "images").glob("*.nii.gz"))
    if model["fold"] == "all":
        return images[: model["train"]], images[: model["score"]]
    return images[: model["train"]], images[model["train"]: model["train"] + model["score"]]


def source_labels(model: dict, image: Path):
    """The case's labels as the model learns them: 1, 2, ... in the order of ``model["labels"]``, each from
    the dataset's values listed there. With ``"head"`` set, the dataset's values are first replaced: 1 is
    the head (the image above Otsu's threshold: its largest component, holes filled) and 2 the dataset's
    label 1 inside it, a large structure that a short training learns beside one it may not."""
    import SimpleITK as sitk

    label = sitk.ReadImage(str(DATA / model["data"] / "labels" / image.name))
    original = sitk.GetArrayFromImage(label)
    if model.get("head"):
        foreground = sitk.OtsuThreshold(sitk.ReadImage(str(image), sitk.sitkFloat32), 0, 1)
        largest = sitk.RelabelComponent(sitk.ConnectedComponent(foreground)) == 1
        head = sitk.GetArrayFromImage(sitk.BinaryFillhole(largest)).astype(np.uint8)
        head[original == 1] = 2
        original = head
    remapped = np.zeros(original.shape, np.uint8)
    for value, originals in enumerate(model["labels"].values(), start=1):
        remapped[np.isin(original, originals)] = value
    result = sitk.GetImageFromArray(remapped)
    result.CopyInformation(label)
    return result


def name_of(image: Path) -> str:
    return image.name.removesuffix(".nii.gz")


def train(key: str, work: Path, iterations: int) -> Path:
    """nnU-Net's fingerprint, planning (edited as the docstring says), preprocessing and training; the result folder."""
    import SimpleITK as sitk
    import torch

    model = MODELS[key]
    dataset = f"Dataset{model['id']}_{key}"
    paths = {name: work / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    os.environ.update({name: str(path) for name, path in paths.items()})
    os.environ.update(nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1", nnUNet_compile="false")
    from nnunet_fixture import trainer_class
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    raw = paths["nnUNet_raw"] / dataset
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    training, _ = cases(model)
    for image in training:
        (raw / "imagesTr" / f"{name_of(image)}_0000.nii.gz").symlink_to(image)
        sitk.WriteImage(source_labels(model, image), str(raw / "labelsTr" / image.name))
    labels = {"background": 0, **{name: value for value, name in enumerate(model["labels"], start=1)}}
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": model["channel"]}, "labels": labels,
                                                  "numTraining": len(training), "file_ending": ".nii.gz"}))
    extract_fingerprints([model["id"]], num_processes=1, check_dataset_integrity=True)
    plan_experiments([model["id"]])
    preprocessed = paths["nnUNet_preprocessed"] / dataset
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    configuration["batch_size"] = 2
    if model["spacing"]:
        configuration["spacing"] = model["spacing"]
    if model.get("patch"):
        configuration["patch_size"] = model["patch"]
    if model["halve"]:
        arguments = configuration["architecture"]["arch_kwargs"]
        arguments["features_per_stage"] = [width // 2 for width in arguments["features_per_stage"]]
    (preprocessed / "nnUNetPlans.json").write_text(json.dumps(plans, indent=2))
    preprocess([model["id"]], "nnUNetPlans", configurations=("3d_fullres",), num_processes=(1,))
    if model["fold"] != "all":
        names = [name_of(image) for image in training]
        split = [{"train": names, "val": names[-2:]}]  # nnU-Net validates on two of them; none is scored
        (preprocessed / "splits_final.json").write_text(json.dumps(split))
    trainer = trainer_class(max(1, iterations // 10), 10, None)(
        plans={**plans, "continue_training": False}, configuration="3d_fullres", fold=model["fold"],
        dataset_json=json.loads((raw / "dataset.json").read_text()), device=torch.device("cpu"))
    trainer.run_training()
    return Path(trainer.output_folder_base)


def side(which: str, folder: str, images: list[str], mirroring: bool, precision: str, threads: int) -> dict:
    """One side in this (child) process: segment every image twice, time the second pass."""
    import torch

    torch.set_num_threads(threads)
    run = _nnunet_runner(Path(folder), mirroring) if which == "nnunet" else _our_runner(Path(folder), mirroring,
                                                                                         precision)
    for image in images:
        run(image)
    started, results = time.perf_counter(), []
    for image in images:
        results.append(run(image))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_mb": _peak_resident_mb(),
            "labelmaps": [result.tolist() for result in results]}


def _peak_resident_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would include the parent's at the fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def _our_runner(folder: Path, mirroring: bool, precision: str):
    from UNet3DSegmenterLib.inference.predictor import Predictor
    from UNet3DSegmenterLib.io import read_volume

    predictor = Predictor(folder, device="cpu", tta=mirroring, precision=precision)
    return lambda image: predictor.predict(read_volume(image)).labelmap.array


def _nnunet_runner(folder: Path, mirroring: bool):
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = PlansManager(json.loads((folder / "plans.json").read_text()))
    dataset = json.loads((folder / "dataset.json").read_text())
    configuration = plans.get_configuration(folder.name.split("__")[-1])
    fold = next(path for path in folder.glob("fold_*") if (path / "checkpoint_final.pth").is_file())
    record = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    network = nnUNetTrainer.build_network_architecture(
        plans, configuration, len(dataset["channel_names"]), len(dataset["labels"]), enable_deep_supervision=False)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(network, plans, configuration, [record["network_weights"]], dataset,
                                    record["trainer_name"], record["inference_allowed_mirroring_axes"])

    def run(image: str) -> np.ndarray:
        data, properties = SimpleITKIO().read_images([image])
        return predictor.predict_single_npy_array(data, properties)

    return run


def in_child(*arguments) -> dict:
    """:func:`side` in a fresh process (its own peak memory; the ISA variables of this one pass on)."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import nnunet_agreement as bench; "
            "print(json.dumps(bench.side(*json.loads(sys.argv[1]))))")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(arguments)], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def agreement(labelmaps: list, theirs: list[np.ndarray]) -> list[float]:
    """The fraction of voxels equal to nnU-Net's, per case."""
    return [round(float((np.asarray(a) == b).mean()), 5) for a, b in zip(labelmaps, theirs)]


def dices(labelmaps: list, references: list[np.ndarray], classes: int) -> list[list[float]]:
    """Dice of each class 1..classes against the reference labels, per case."""
    return [[round(dice(np.asarray(labelmap) == value, reference == value), 4) for value in range(1, classes + 1)]
            for labelmap, reference in zip(labelmaps, references)]


def compare(key: str, folder: Path, threads: int, bf16: bool, settings=(False, True)) -> dict:
    import SimpleITK as sitk

    from UNet3DSegmenterLib.runtime import cpu_supports_bf16

    model = MODELS[key]
    _, scored = cases(model)
    images = [str(image) for image in scored]
    references = [sitk.GetArrayFromImage(source_labels(model, image)) for image in scored]
    report: dict = {}
    native_bf16 = cpu_supports_bf16()
    for mirroring in settings:
        nnunet = in_child("nnunet", str(folder), images, mirroring, "fp32", threads)
        ours = in_child("ours", str(folder), images, mirroring, "fp32", threads)
        entry = {"nnunet_seconds": round(nnunet["seconds"], 2), "ours_seconds": round(ours["seconds"], 2),
                 "speedup": round(nnunet["seconds"] / ours["seconds"], 2),
                 "nnunet_peak_mb": round(nnunet["peak_mb"]), "ours_peak_mb": round(ours["peak_mb"])}
        theirs = [np.asarray(labelmap) for labelmap in nnunet["labelmaps"]]
        classes = len(model["labels"])
        entry["agreement_fp32"] = agreement(ours["labelmaps"], theirs)
        entry["dice_nnunet"], entry["dice_ours"] = (dices(theirs, references, classes),
                                                    dices(ours["labelmaps"], references, classes))
        if bf16 and (native_bf16 or not mirroring):  # without native bf16 it is emulated and slow: once
            low = in_child("ours", str(folder), images, mirroring, "bf16", threads)
            entry["agreement_bf16"] = agreement(low["labelmaps"], theirs)
            entry["dice_ours_bf16"] = dices(low["labelmaps"], references, classes)
            entry["ours_bf16_seconds"] = round(low["seconds"], 2)
            entry["speedup_bf16"] = round(nnunet["seconds"] / low["seconds"], 2)
            entry["ours_bf16_peak_mb"] = round(low["peak_mb"])
        report["mirroring" if mirroring else "no_mirroring"] = entry
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="work folder (trained models are kept there)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--iterations", type=int, default=40, help="training iterations per model (default 40)")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads for each side (default 1)")
    parser.add_argument("--skip-training", action="store_true", help="reuse the models trained in --output")
    parser.add_argument("--train-only", action="store_true", help="train the models, compare nothing")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 runs")
    parser.add_argument("--mirroring", nargs="+", choices=("off", "on"), default=["off", "on"],
                        help="which mirroring settings to run (default both)")
    args = parser.parse_args()
    import torch

    report = {"cpu": _cpu_name(), "isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
              "threads": args.threads, "torch": torch.__version__}
    for key in args.models:
        work = args.output / key
        found = sorted(work.glob("nnUNet_results/*/*__*__3d_fullres"))
        if not (args.skip_training and found):
            shutil.rmtree(work, ignore_errors=True)
            found = [train(key, work, args.iterations)]
        if args.train_only:
            continue
        report[key] = compare(key, found[0], args.threads, not args.no_bf16,
                              tuple(setting == "on" for setting in args.mirroring))
        print(json.dumps({key: report[key]}), file=sys.stderr)
    print(json.dumps(report, indent=1))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
