"""Cases per second of ``predict`` over a folder: one process against two processes under ``torchrun`` (gloo).

Runs the real command three times on the same folder of images with the same checkpoint: one process
with PyTorch's default threads, one process with one thread, and ``torchrun --nproc-per-node 2``
(one thread each, as torchrun sets). Each wall time is the whole command, start-up included, as a user
sees it, and the CPU seconds of its processes (less disturbed by other jobs on a shared machine); the
inference-path cache is warmed first, so that no run measures its paths. The outputs of the runs are
compared byte for byte, and where files differ, voxel by voxel.

    .venv/bin/python bench/predict_processes.py \
        --checkpoint Resources/Models/hippocampus.pt --images ../shared/data/msd_hippocampus/images
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="a folder of volume files")
    parser.add_argument("--cases", type=int, default=0, help="the first N images only (0: all)")
    parser.add_argument("--single-thread-only", action="store_true",
                        help="leave out the one-process run with the default threads (the two runs that compute "
                             "alike: one thread per process)")
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
        if args.single_thread_only:
            del runs["one process, default threads"]
        timings = {name: _run(command, {**environment, **extra}) for name, (command, extra) in runs.items()}
        pairs = [("two", "one_thread")] + ([] if args.single_thread_only else [("two", "one"), ("one_thread", "one")])
        comparisons = {f"{first} vs {second}": _compare(work / first, work / second) for first, second in pairs}
    print(json.dumps({
        "cpu": _cpu_name(), "cores": os.cpu_count(), "checkpoint": str(args.checkpoint), "cases": len(cases),
        "wall_seconds": {name: wall for name, (wall, _) in timings.items()},
        "cpu_seconds": {name: cpu for name, (_, cpu) in timings.items()},
        "cases_per_second": {name: len(cases) / wall for name, (wall, _) in timings.items()},
        "outputs (two: torchrun, one_thread, one: default threads)": comparisons,
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


def _run(command: list[str], environment: dict[str, str]) -> tuple[float, float]:
    """Wall seconds of the command, and the CPU seconds (user + system) of its processes."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=environment,
                            cwd=Path(__file__).resolve().parents[1])
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def _compare(first: Path, second: Path) -> dict:
    """How many output files are byte-identical, and for the others how many voxels differ."""
    from UNet3DSegmenterLib import read_volume

    names = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    if names != sorted(path.relative_to(second) for path in second.rglob("*") if path.is_file()):
        return {"same_file_names": False}
    differing = [name for name in names if (first / name).read_bytes() != (second / name).read_bytes()]
    voxels = [int((read_volume(first / name).array != read_volume(second / name).array).sum()) for name in differing]
    return {"files": len(names), "byte_identical": len(names) - len(differing),
            "differing_files": {str(name): count for name, count in zip(differing, voxels)}}


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
