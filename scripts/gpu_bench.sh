#!/usr/bin/env bash
# The GPU table of issue 15 in one call: fgjax's estimator benchmark and both peer anchors
# (PyTorch MeZO and naive JAX, ../shared/anchors) on the same accelerator, batch 64 and 256.
#
# Two stages, because the accelerator machine has no internet and sees only the repository:
#   1. here (with internet), from the repo root:   bash scripts/gpu_bench.sh prepare
#      -> .whl/aqtp-*.whl (AQT, the one dependency the device image lacks; pure Python) and
#         .anchors/ (a copy of ../shared/anchors, which does not travel with the repo).
#      Both folders are git-ignored through .git/info/exclude.
#   2. on the device, from the repo root, carrying both folders:
#      bash scripts/gpu_bench.sh run       (results under $OUT, or results/gpu without $OUT)
#      With this workplace's device tool:
#        run(command="bash scripts/gpu_bench.sh run", carry=[".whl", ".anchors"], timeout_s=540)
#
# Sized to finish in about 8 minutes on one H200 (each stage has its own timeout, and every stage
# writes its rows as it goes, so a stage that runs out still leaves the ones before it):
#   MeZO anchor ~1 min, naive JAX anchor ~1.5 min, fgjax ResNet-18 and ViT-tiny ~4.5 min (K = 1
#   and 16: the issue's GPU targets), then the MLP if time is left. The table: $OUT/fgjax/bench.md.
# Files back (the device tool returns at most 8): gpu_bench.log, mezo_torch.jsonl, naive_jax.jsonl,
# fgjax/bench.{md,csv,jsonl}, fgjax_mlp/bench.{md,jsonl}.
set -uo pipefail

stage="${1:-run}"
anchors_src="${ANCHORS:-../shared/anchors}"

if [[ "$stage" == "prepare" ]]; then
  set -e
  exclude="$(git rev-parse --git-path info/exclude)"
  mkdir -p "$(dirname "$exclude")"
  for folder in /.whl/ /.anchors/; do
    grep -qx "$folder" "$exclude" 2>/dev/null || echo "$folder" >>"$exclude"
  done
  mkdir -p .whl
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl aqtp==0.9.0
  rm -rf .anchors && cp -r "$anchors_src" .anchors
  rm -rf .anchors/results
  du -sh .whl .anchors
  exit 0
fi

out="${OUT:-results/gpu}"
mkdir -p "$out"
log="$out/gpu_bench.log"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
anchors=.anchors
[[ -d "$anchors" ]] || anchors="$anchors_src"

{
  date
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)"
} 2>&1 | tee "$log"

start=$SECONDS
# Peers first: they are the reference every fgjax ratio is read against.
timeout 75 python3 "$anchors/mezo_torch_bench.py" --device cuda --batch 64 256 --steps 20 \
  2>&1 | tee "$out/mezo_torch.jsonl" | tee -a "$log"
echo "mezo anchor: $((SECONDS - start)) s" | tee -a "$log"
timeout 110 python3 "$anchors/naive_jax_bench.py" --batch 64 256 \
  2>&1 | tee "$out/naive_jax.jsonl" | tee -a "$log"
echo "naive JAX anchor: $((SECONDS - start)) s" | tee -a "$log"
# fgjax: the anchors' ResNet-18 and ViT-tiny, K = 1 and 16 ("auto": all directions vmapped on an
# accelerator), beside backprop and the naive JAX steps, in one process.
timeout 270 python3 scripts/bench_estimators.py --models resnet18 vit --batch 64 256 \
  --ks 1 16 --repeats 20 --anchors "$anchors" --output_dir "$out/fgjax" 2>&1 | tee -a "$log"
echo "fgjax: $((SECONDS - start)) s" | tee -a "$log"
# If time is left: the MLP (the CPU table's first model) at the same sizes.
if (( SECONDS - start < 400 )); then
  timeout $((470 - (SECONDS - start))) python3 scripts/bench_estimators.py --models mlp \
    --batch 64 256 --ks 1 16 --repeats 20 --output_dir "$out/fgjax_mlp" 2>&1 | tee -a "$log"
  rm -f "$out/fgjax_mlp/bench.csv"
fi
echo "total: $((SECONDS - start)) s" | tee -a "$log"
ls -la "$out" "$out"/* | tee -a "$log"
