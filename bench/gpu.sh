#!/usr/bin/env bash
# The GPU benchmarks in one call of the lent device machine (BENCHMARKS.md), most wanted first.
# Its image has torch but not open_clip, zarr or numcodecs: those travel as wheels in .whl/.
#   device run: bash bench/gpu.sh   (with carry [".whl"]; results and log.txt land in $OUT)
#   CPU dry run first: DRY=1 PYTHON=.venv/bin/python bash bench/gpu.sh (same scripts, tiny sizes)
# A script runs only while BUDGET seconds last and it gets its whole share (one stopped midway
# writes nothing), so a slow start costs the least wanted rows, never a half-written one.
# ROWS="aux step_dead" runs only the rows named (each `within` call's first word; default all).
# All rows need ~830 s, more than one call's 600: the first call gets the first rows, and a second
# with ROWS naming those skipped gets the rest. At most 8 files come back: the step rows share one.
set -uo pipefail
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
OUT=${OUT:-bench/results}
PY=${PYTHON:-python3}
if [ -n "${DRY:-}" ]; then
  DEV=cpu MODEL=ViT-B-32 LAYERS=2,5,8,11 LATENTS=4096 TOKENS=65536 IMAGES=64 STEPS=5 WORKERS=2 READERS=1,2 T=4
else
  DEV=cuda MODEL=ViT-L-14 LAYERS=2,5,8,11,14,17,20,22 LATENTS=65536 TOKENS=1048576 IMAGES=1024 STEPS=50 WORKERS=12 \
      READERS=4,8,12 T=1
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .whl/*.whl || exit 1
  # vitscope as pyproject.toml installs it (stage folders under one namespace), no build step
  mkdir -p /tmp/site/vitscope && cp -r vitscope/. /tmp/site/vitscope/
  for stage in support cache_spec pipeline train saes analysis; do
    cp -r "$stage" "/tmp/site/vitscope/$stage"
  done
  export PYTHONPATH=/tmp/site
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
END=$((SECONDS + ${BUDGET:-510} * T))
ROWS=" ${ROWS:-all} "
# within ROW SECS (times T): run the command under that timeout if ROWS names the row and the
# budget still holds it, else skip
within() {
  local row=$1 secs=$(($2 * T)); shift 2
  [[ $ROWS == " all " || $ROWS == *" $row "* ]] || return 0
  if ((SECONDS + secs > END)); then
    echo "skipped (budget): $*"
    return
  fi
  echo "== $(date -u +%T) $*"
  timeout "$secs" "$@" || echo "exit $? after $((SECONDS))s: $*"
}
$PY -P -c "import torch, zarr; from vitscope.pipeline.model import import_open_clip as o
print(torch.__version__, zarr.__version__, o().__version__)"
within step 90 $PY bench/train_step.py --device $DEV --latents $LATENTS --repeats $STEPS \
    --out "$OUT/train_step_gpu.md"
within aux 60 $PY bench/aux_recon.py --device $DEV --latents $LATENTS --out "$OUT/aux_recon_gpu.md"
within profile 60 $PY bench/step_profile.py --device $DEV --latents $LATENTS --out "$OUT/train_step_gpu.md"
within gradcheck 60 $PY bench/gradcheck.py --device $DEV
for codec in none zstd-1; do
  within cache 75 $PY bench/cache_throughput.py --model $MODEL --device $DEV \
      --images $((IMAGES / 2)) --batch-size 128 --num-workers $WORKERS --write-threads $WORKERS \
      --shard-size 32 --repeats 1 --max-repeats 1 --quiet-wait 0 --codec "$codec" --append \
      --out "$OUT/cache_throughput_gpu.md" --workdir "/tmp/cache-bench-$codec"
done
within throughput 150 $PY bench/train_throughput.py --device $DEV --latents $LATENTS \
    --tokens $TOKENS --images $IMAGES --readers ${READERS##*,} --out "$OUT/train_throughput_gpu.md"
within decode 60 $PY bench/decode_paths.py --device $DEV --model $MODEL --layers $LAYERS \
    --images $((IMAGES / 4)) --out "$OUT/decode_paths_gpu.md"
within loader 60 $PY bench/loader_rate.py --images $((IMAGES / 2)) --readers $READERS \
    --repeats 1 --out "$OUT/loader_rate_gpu_host.md"
within step_dead 40 $PY bench/train_step.py --device $DEV --latents $LATENTS --repeats $((STEPS / 2)) \
    --dead 0.25 --out "$OUT/train_step_gpu.md"
within sweep 100 $PY bench/sweep.py --device $DEV --latents $LATENTS --images $((IMAGES / 2)) \
    --tokens $((TOKENS / 4)) --out "$OUT/sweep_gpu.md"
ls -la "$OUT"
