#!/usr/bin/env bash
# The CUDA checks in one run, printing one JSON document on stdout (progress goes to stderr):
#   1. inference: our Predictor (fp16 autocast, batch 4) against MONAI's sliding_window_inference
#      (fp32) on the same weights: the 16-256 UNet3D in batch and instance norm on the phantom and
#      MNI152, and the bundled model on real hippocampus crops;
#   2. a CT-sized volume (400x512x512) with the window sums on the GPU: seconds, GPU and host memory;
#   3. the out-of-memory fallback on the real GPU: a memory cap makes the first plan run out, and
#      the labelmap must come out the same with the sums on the CPU, then with the CPU only;
#   4. a short training, ours against MONAI's loop, on the GPU.
# About four minutes on one H200-class GPU. Needs the bench extra (MONAI).
#
#   bench/gpu.sh [python]            # default: .venv-bench/bin/python, else .venv/bin/python
#   DEVICE=cpu bench/gpu.sh          # the same steps, tiny, on the CPU: checks the script itself
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
python=${1:-}
if [[ -z "$python" ]]; then
    python="$root/.venv-bench/bin/python"
    [[ -x "$python" ]] || python="$root/.venv/bin/python"
fi
device=${DEVICE:-cuda}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [[ "$device" == cuda ]]; then
    "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to PyTorch')"
    cases=(volumes hippocampus)
    inference=(--repeats 2 --train-iterations 40)
    large=(--large-shape 400 512 512)
    training=(--patch 96 --batch-size 2 --cases 4 --warmup 3 --iterations 20 --repeats 1)
else  # a smoke run of every step but the whole-volume comparison, small enough for two cores
    cases=(hippocampus)
    inference=(--repeats 1 --train-iterations 2 --hippocampus-cases 2)
    large=(--large-shape 96 192 192)
    training=(--patch 32 --batch-size 2 --cases 2 --warmup 1 --iterations 2 --repeats 1 --depth 3)
fi

echo "gpu.sh: inference, ours against MONAI ($device)" >&2
"$python" "$here/inference.py" --device "$device" --cases "${cases[@]}" "${inference[@]}" > "$work/inference.json"
echo "gpu.sh: a CT-sized volume and the out-of-memory fallback ($device)" >&2
"$python" "$here/inference.py" --device "$device" --cases large oom "${inference[@]}" "${large[@]}" \
    > "$work/large.json"
echo "gpu.sh: a short training, ours against MONAI's loop ($device)" >&2
"$python" "$here/training.py" --device "$device" "${training[@]}" > "$work/training.json"

"$python" - "$work" "$device" <<'PYTHON'
import json, sys
from pathlib import Path

work, device = Path(sys.argv[1]), sys.argv[2]
parts = {name: json.loads((work / f"{name}.json").read_text()) for name in ("inference", "large", "training")}
print(json.dumps({"device": device, **parts}, indent=2))
PYTHON
