"""nnU-Net's predictor and this engine side by side in one process, case by case, on a model nnU-Net trained.

The short form of bench/nnunet_agreement.py for a busy machine: both sides are built once (nnU-Net's
``nnUNetPredictor`` with its defaults, float32; this engine's ``Predictor`` in float32), warmed up on
the first case, then segment each scored case in turn, nnU-Net first, from the file to the labelmap;
wall and CPU seconds are summed per side, so that load from other jobs falls on both alike. One
PyTorch thread. ``mirror`` as the first argument turns mirroring on for both; ``memory`` instead runs
each side in a process of its own (twice, alternating; nnunet_agreement.side) and prints its peak
resident memory (VmHWM: the whole process, its imports included).

    .venv-bench/bin/python bench/nnunet_agreement.py --output /tmp/nnunet-bench --models mri   # trains the model
    .venv-bench/bin/python bench/nnunet_speed.py [mirror]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv-bench/bin/python bench/nnunet_speed.py   # as AVX2 only
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nnunet_agreement as bench  # noqa: E402

FOLDER = Path("/tmp/nnunet-bench/mri/nnUNet_results/Dataset911_mri/nnUNetTrainerTiny__nnUNetPlans__3d_fullres")


def main() -> None:
    torch.set_num_threads(1)
    mirroring = sys.argv[1:] == ["mirror"]
    _, scored = bench.cases(bench.MODELS["mri"])
    images = [str(image) for image in scored]
    if sys.argv[1:] == ["memory"]:
        for side in ("nnunet", "ours", "nnunet", "ours"):
            result = bench.in_child(side, str(FOLDER), images, False, "fp32", 1)
            print(json.dumps({"side": side, "seconds": round(result["seconds"], 2),
                              "peak_mb": round(result["peak_mb"])}))
        return
    runners = {"nnunet": bench._nnunet_runner(FOLDER, mirroring), "ours": bench._our_runner(FOLDER, mirroring, "fp32")}
    for run in runners.values():
        run(images[0])
    wall = dict.fromkeys(runners, 0.0)
    cpu = dict.fromkeys(runners, 0.0)
    labelmaps: dict[str, list] = {name: [] for name in runners}
    for image in images:
        for name, run in runners.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            labelmaps[name].append(run(image))
            wall[name] += time.perf_counter() - started
            cpu[name] += time.process_time() - started_cpu
    print(json.dumps({"mirroring": mirroring, "cpu": bench._cpu_name(), "wall_seconds": wall, "cpu_seconds": cpu,
                      "speedup_wall": round(wall["nnunet"] / wall["ours"], 2),
                      "speedup_cpu": round(cpu["nnunet"] / cpu["ours"], 2),
                      "agreement": [float((ours == theirs).mean())
                                    for ours, theirs in zip(labelmaps["ours"], labelmaps["nnunet"])],
                      "nnunet_foreground_voxels": [int((theirs > 0).sum()) for theirs in labelmaps["nnunet"]]}))


if __name__ == "__main__":
    main()
