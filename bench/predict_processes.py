"""Cases per second of ``predict`` over a folder: one process against two processes under ``torchrun`` (gloo).

Runs the real command three times on the same folder of images with the same checkpoint: one process
with PyTorch's default threads, one process with one thread, and ``torchrun --nproc-per-node 2``
(one thread each, as torchrun sets). Each wall time is the whole command, start-up included, as a user
sees it; the inference-path cache is warmed first, so that no run measures its paths. The outputs of
the three runs are compared byte for byte.

    flock /work/cpu.lock .venv/bin/python bench/predict_processes.py \
        --checkpoint Resources/Models/hippocampus.pt --images ../shared/data/msd_hippocampus/images
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="a folder of volume files")
    parser.add_argument("--cases", type=int, default=0, help="the first N images only (0: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work_folder:
        work = Path(work_folder)
        cases = _link_cases(args.images, work / "images", args.cases)
        environment = {**os.environ, "UNET3D_SEGMENTER_CACHE": str(work / "cache")}
        _run(_predict(args.checkpoint, cases[0], work / "warm.nii.gz"), environment)  # measure the paths once
        folder = work / "images"
        runs = {
            "one process, default threads": (_predict(args.checkpoint, folder, work / "one"), {}),
            "one process, 1 thread": (_predict(args.checkpoint, folder, work / "one_thread"), {"OMP_NUM_THREADS": "1"}),
            "torchrun, 2 processes (gloo), 1 thread each": (
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 *_predict(args.checkpoint, folder, work / "two")[1:]], {}),
        }
        seconds = {name: _run(command, {**environment, **extra}) for name, (command, extra) in runs.items()}
        identical = {name: _same_files(work / "one", work / output)
                     for name, output in (("one process, 1 thread", "one_thread"),
                                          ("torchrun, 2 processes (gloo), 1 thread each", "two"))}
    print(json.dumps({
        "cpu": _cpu_name(), "cores": os.cpu_count(), "checkpoint": str(args.checkpoint), "cases": len(cases),
        "seconds": seconds, "cases_per_second": {name: len(cases) / value for name, value in seconds.items()},
        "byte_identical_to_one_process": identical,
    }, indent=2))


def _link_cases(images: Path, folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    sources = sorted(path for path in images.iterdir() if path.name.endswith((".nii.gz", ".nii", ".nrrd", ".mha")))
    links = []
    for source in sources[:count or None]:
        (folder / source.name).symlink_to(source.resolve())
        links.append(folder / source.name)
    return links


def _predict(checkpoint: Path, source: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "UNet3DSegmenterLib", "predict", "-c", str(checkpoint), "-i", str(source),
            "-o", str(output), "--device", "cpu"]


def _run(command: list[str], environment: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=environment,
                            cwd=Path(__file__).resolve().parents[1])
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def _same_files(first: Path, second: Path) -> bool:
    names = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    return names == sorted(path.relative_to(second) for path in second.rglob("*") if path.is_file()) and all(
        (first / name).read_bytes() == (second / name).read_bytes() for name in names)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
