#!/usr/bin/env bash
# The GPU benchmarks of issues 3 and 4 in one call of the lent device machine (see BENCHMARKS.md).
# Its image has torch but not open_clip, zarr or numcodecs: those travel as wheels in .whl/.
#   device run: bash bench/gpu.sh   (with carry [".whl"]; results land in $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
OUT=${OUT:-bench/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl || exit 1
# vitscope as pyproject.toml installs it (stage folders under one namespace), without a build step
mkdir -p /tmp/site/vitscope && cp -r vitscope/. /tmp/site/vitscope/
for stage in support cache_spec pipeline train saes analysis; do cp -r "$stage" "/tmp/site/vitscope/$stage"; done
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, zarr, open_clip; print(torch.__version__, zarr.__version__, open_clip.__version__)"
timeout 80 python3 bench/train_step.py --device cuda --repeats 10 --out "$OUT/train_step_gpu.md"
timeout 100 python3 bench/train_throughput.py --device cuda --latents 65536 --tokens 1048576 \
    --images 1024 --readers 12 --out "$OUT/train_throughput_gpu.md"
timeout 100 python3 bench/gradcheck.py --device cuda
for codec in none zstd-1; do
  timeout 75 python3 bench/cache_throughput.py --model ViT-L-14 --device cuda --images 512 \
      --batch-size 128 --num-workers 12 --write-threads 12 --shard-size 32 --repeats 1 \
      --max-repeats 1 --quiet-wait 0 --codec "$codec" --append --out "$OUT/cache_throughput_gpu.md" \
      --workdir "/tmp/cache-bench-$codec"
done
timeout 90 python3 bench/decode_paths.py --device cuda --images 256 --out "$OUT/decode_paths_gpu.md"
ls -la "$OUT"
