"""Training throughput and peak memory: our training loop against MONAI's, side by side in one run.

Both sides train the same network (our UNet3D with instance norm, widths 16-32-64-128-256 by
default) with Dice + cross-entropy, AdamW, batches of 64^3 patches sampled from the same phantom
volumes, read from the same NIfTI files, with the same number of loader workers:

- ours: ``prepare_cases`` -> ``PatchDataset`` / ``make_loader`` -> ``TrainingStep`` (what ``train``
  runs, at its default precision and layout for this device: channels-last with its instance norm
  on the CPU, freed activations reused), augmentation off; then with augmentation on; then in fp32,
  to show how much of the difference is precision;
- MONAI: the loop of MONAI's tutorials: ``CacheDataset`` (LoadImaged, EnsureChannelFirstd,
  NormalizeIntensityd, RandCropByPosNegLabeld), ``monai.data.DataLoader``, ``DiceCELoss(to_onehot_y,
  softmax)``, ``torch.optim.AdamW`` and a plain PyTorch loop.

Each measurement runs in its own process (so its peak RSS is its own), the sides alternate, and
the JSON printed at the end gives medians and the ratios. Usage::

    .venv/bin/python bench/training.py --repeats 3 --iterations 10
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

SIDES = ("ours", "ours_augmented", "ours_fp32", "monai")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, default=64, help="patch edge in voxels")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--base-width", type=int, default=16)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="iterations before timing starts")
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per side, alternating")
    parser.add_argument("--workers", type=int, default=1, help="loader processes, both sides")
    parser.add_argument("--threads", type=int, default=0,
                        help="compute threads per side (0: PyTorch's default); on a machine shared with other "
                             "work, fewer threads than cores avoids OpenMP threads spinning against it")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both sides train")
    parser.add_argument("--run", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(_measure(args)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-training-") as folder:
        data = _write_data(Path(folder), args)
        runs = {side: [] for side in SIDES}
        for repeat in range(args.repeats):
            for side in SIDES if repeat % 2 == 0 else SIDES[::-1]:
                runs[side].append(_child(side, data, args))
                print(f"repeat {repeat + 1}/{args.repeats} {side}: "
                      f"{runs[side][-1]['patches_per_second']:.3f} patches/s", file=sys.stderr)
    print(json.dumps(_summary(runs, args), indent=2))


def _write_data(folder: Path, args) -> Path:
    from UNet3DSegmenterLib.io import write_volume
    from UNet3DSegmenterLib.phantom import make_phantom

    shape = (args.patch + 16, args.patch + 32, args.patch + 32)
    for index in range(args.cases):
        image, labels = make_phantom(shape=shape, spacing=(1.0, 1.0, 1.0), seed=index, classes=2)
        write_volume(image, folder / "images" / f"case_{index}.nii.gz")
        write_volume(labels, folder / "labels" / f"case_{index}.nii.gz")
    return folder


def _child(side: str, data: Path, args) -> dict:
    command = [sys.executable, __file__, "--run", side, "--data", str(data)] + [
        f"--{name.replace('_', '-')}={getattr(args, name)}"
        for name in ("patch", "batch_size", "depth", "base_width", "warmup", "iterations", "workers", "threads",
                     "device")]
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


def _measure(args) -> dict:
    import contextlib

    import torch

    from UNet3DSegmenterLib.runtime import reuse_freed_memory

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loader, step = (_monai if args.run == "monai" else _ours)(args)
    batches = iter(loader)
    # ours as the trainer runs it: freed activations kept for the next step (see reuse_freed_memory)
    with reuse_freed_memory() if args.run != "monai" else contextlib.nullcontext():
        for _ in range(args.warmup):
            step(*next(batches))
        started, cpu_started = time.perf_counter(), time.process_time()
        losses = [step(*next(batches)) for _ in range(args.iterations)]  # each returns a float: synchronised
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the training process; workers aside
    result = {"patches_per_second": args.iterations * args.batch_size / seconds, "seconds": seconds,
              "patches_per_cpu_second": args.iterations * args.batch_size / cpu_seconds,
              "peak_rss_mb": peak, "last_loss": losses[-1]}
    if args.device == "cuda":
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _network(args):
    from UNet3DSegmenterLib.models import UNet3D

    return UNet3D(in_channels=1, out_channels=3, depth=args.depth, base_width=args.base_width)


def _ours(args):
    import torch

    from UNet3DSegmenterLib.datalist import folder_pair
    from UNet3DSegmenterLib.preprocess import Preprocessing
    from UNet3DSegmenterLib.runtime import training_dtype
    from UNet3DSegmenterLib.training.augment import Augmenter
    from UNet3DSegmenterLib.training.losses import build_loss
    from UNet3DSegmenterLib.training.patches import EpochSampler, PatchDataset, make_loader, prepare_cases
    from UNet3DSegmenterLib.training.step import TrainingStep

    device = torch.device(args.device)
    datalist = folder_pair(args.data / "images", args.data / "labels")
    cases = prepare_cases(datalist.cases, Preprocessing(spacing=(1.0, 1.0, 1.0)), [0, 1, 2])
    samples = (args.warmup + args.iterations) * args.batch_size
    loader = make_loader(PatchDataset(cases, (args.patch,) * 3), EpochSampler(samples), args.batch_size, args.workers,
                         pin_memory=device.type == "cuda")
    precision = "fp32" if args.run == "ours_fp32" else "auto"
    step = TrainingStep.create(_network(args), build_loss("dicece", 3), "adamw", 1e-4, 1e-2, 12.0, device,
                               training_dtype(precision, device))
    augment = Augmenter(enabled=args.run == "ours_augmented")
    generator = torch.Generator(device).manual_seed(0)

    def train_step(images, labels):  # as the trainer does it
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        return step(*augment(images, labels, generator))

    return loader, train_step


def _monai(args):
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd, RandCropByPosNegLabeld

    files = [{"image": str(path), "label": str(args.data / "labels" / path.name)}
             for path in sorted((args.data / "images").iterdir())]
    transforms = Compose([
        LoadImaged(keys=["image", "label"]),
        EnsureChannelFirstd(keys=["image", "label"]),
        NormalizeIntensityd(keys="image"),
        RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=(args.patch,) * 3,
                               pos=1, neg=1, num_samples=1, image_key="image"),
    ])
    dataset = CacheDataset(files, transforms, cache_rate=1.0, num_workers=0, progress=False)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        persistent_workers=args.workers > 0)
    device = torch.device(args.device)
    model = _network(args).to(device)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)

    def forever():
        while True:
            for batch in loader:
                yield batch["image"], batch["label"]

    def train_step(inputs, labels):
        inputs, labels = inputs.to(device), labels.to(device)
        model.train()
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = loss_function(outputs, labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    return forever(), train_step


def _summary(runs: dict, args) -> dict:
    import monai
    import torch

    from UNet3DSegmenterLib.runtime import processor_record, training_dtype

    def side(name):
        speeds = [run["patches_per_second"] for run in runs[name]]
        return {"patches_per_second": statistics.median(speeds), "runs": [round(speed, 4) for speed in speeds],
                "patches_per_cpu_second": statistics.median(run["patches_per_cpu_second"] for run in runs[name]),
                "peak_rss_mb": round(max(run["peak_rss_mb"] for run in runs[name]), 1)}

    result = {name: side(name) for name in SIDES}
    device = torch.device(args.device)
    result["ours"]["precision"] = str(training_dtype("auto", device)).replace("torch.", "")
    return {
        "benchmark": "training throughput, ours vs MONAI",
        "machine": {"processor": processor_record(), "cores": _cores(),
                    "torch": torch.__version__, "monai": monai.__version__,
                    "threads": args.threads or torch.get_num_threads(), "device": args.device,
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
        "settings": {"network": f"UNet3D depth {args.depth} base width {args.base_width}",
                     "batch": f"{args.batch_size} x {args.patch}^3", "loss": "Dice + cross-entropy",
                     "optimizer": "AdamW", "warmup_iterations": args.warmup, "timed_iterations": args.iterations,
                     "repeats": args.repeats, "workers": args.workers},
        **result,
        "throughput_ratio": result["ours"]["patches_per_second"] / result["monai"]["patches_per_second"],
        "throughput_ratio_with_augmentation": (result["ours_augmented"]["patches_per_second"]
                                               / result["monai"]["patches_per_second"]),
        "throughput_ratio_fp32": result["ours_fp32"]["patches_per_second"] / result["monai"]["patches_per_second"],
        # the training process's CPU time (loader workers aside): with --threads 1, the figure that
        # other jobs on a shared machine disturb least
        "cpu_throughput_ratio": (result["ours"]["patches_per_cpu_second"]
                                 / result["monai"]["patches_per_cpu_second"]),
        "peak_rss_ratio": result["ours"]["peak_rss_mb"] / result["monai"]["peak_rss_mb"],
    }


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    main()
