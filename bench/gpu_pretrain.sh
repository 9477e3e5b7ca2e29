#!/usr/bin/env bash
# LXMERT-base pre-training throughput on one GPU, every attention backend, plus the HF baseline.
#
#   On the development machine (network):  bench/gpu_pretrain.sh --prepare WHEELS_DIR
#   On the GPU machine (no network):        bench/gpu_pretrain.sh OUT_DIR [WHEELS_DIR]
#
# --prepare fills WHEELS_DIR with ../shared/gpu/make-wheels.sh's wheels (deepspeed, webdataset, ...) and
# the BERT vocab.txt (the GPU machine lacks the package that ships it). The run then:
#   1. installs those wheels into a private site dir if deepspeed or webdataset is missing;
#   2. records the environment and runs the GPU kernel tests and bench/kernels.py;
#   3. writes a synthetic corpus (2048-d features, 36 boxes) with lxtrain.data.synthetic;
#   4. times HF LxmertForPreTraining and then lxtrain's model (sdpa, fused) in one process, same on-GPU
#      batch, bf16 autocast, torch fused AdamW (the model alone); the same through DeepSpeed's engine
#      (ZeRO-2 and ZeRO-0, no loader); and the training loader alone;
#   5. runs STEPS steps of the real lxtrain/pretrain.py, DeepSpeed bf16 ZeRO-2 (ds_configs/zero2_bf16.json
#      for world size 1) for LXTRAIN_ATTENTION=fused, sdpa, eager;
#   6. writes OUT_DIR/results.json and OUT_DIR/results.md (samples/s, MFU, peak memory, ratios).
# Knobs (environment): BATCH (micro-batch = batch, default 256), WORKERS (8), WARM_STEPS (4 per worker:
# the loader's first pass over its shared-memory batch ring, which page-faults fresh memory and runs
# several times slower; the medians leave these steps out), STEPS (WARM_STEPS + 40), LOG_EVERY (5),
# BACKENDS ("fused sdpa eager"), SKIP_TESTS=1, SKIP_KERNELS=1, SKIP_HF=1, DRY_RUN=1 (tiny model, CPU ok),
# STAGE_TIMEOUT (seconds for each stage: the tests, the kernel bench, the FusedAdam build, each run;
# default 300), so that one stage that hangs or compiles too long cannot eat a short lease; TESTS (the
# test files, default "tests/test_kernels.py tests/test_gpu.py") and TEST_ARGS (extra pytest arguments).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}

if [[ "${1:-}" == "--prepare" ]]; then
  wheels=${2:?usage: gpu_pretrain.sh --prepare WHEELS_DIR}
  # deepspeed's own requirements beyond those make-wheels.sh names, in case the image lacks one.
  "$repo/../shared/gpu/make-wheels.sh" "$wheels" einops msgpack py-cpuinfo nvidia-ml-py
  "$python" -c "from lxtrain.data.tokenizer import default_vocab_path; print(default_vocab_path())" \
    | xargs -I{} cp {} "$wheels/vocab.txt"
  echo "prepared $wheels: carry it to the GPU machine and run bench/gpu_pretrain.sh OUT_DIR $wheels"
  exit 0
fi

out=$(mkdir -p "${1:?usage: gpu_pretrain.sh OUT_DIR [WHEELS_DIR] | --prepare WHEELS_DIR}" && cd "$1" && pwd)
wheels=${2:-$repo/wheels}
batch=${BATCH:-256}
workers=${WORKERS:-8}
warm_steps=${WARM_STEPS:-$(( workers * 4 ))}  # 4 = the ring per worker: prefetch_factor 2 + 2
steps=${STEPS:-$(( warm_steps + 40 ))}
log_every=${LOG_EVERY:-5}
backends=${BACKENDS:-fused sdpa eager}  # the ratios' numerators first
stage_timeout=${STAGE_TIMEOUT:-300}
model=base
if [[ -n "${DRY_RUN:-}" ]]; then  # the whole pipeline with a tiny model: for checking this script on CPU
  model=tiny; batch=${BATCH:-4}; steps=${STEPS:-4}; log_every=${LOG_EVERY:-1}; workers=${WORKERS:-0}
  warm_steps=${WARM_STEPS:-1}
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# A free port for the single-rank process group (a fixed default may be taken on a shared machine).
export MASTER_PORT=${MASTER_PORT:-$("$python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
cd "$repo"
log() { echo "[gpu_pretrain $(date +%H:%M:%S)] $*" | tee -a "$out/run.log"; }

# 1. Dependencies the GPU image lacks, from carried wheels (no network there).
if ! "$python" -c "import deepspeed, webdataset" 2>/dev/null; then
  [[ -d "$wheels" ]] || { echo "deepspeed/webdataset missing and no wheels at $wheels (see --prepare)" >&2; exit 2; }
  log "installing carried wheels from $wheels"
  "$python" -m pip install -q --no-index --no-deps --target /tmp/lxtrain-site "$wheels"/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/lxtrain-site"
fi
if ! "$python" -c "from lxtrain.data.tokenizer import default_vocab_path; default_vocab_path()" 2>/dev/null; then
  [[ -f "$wheels/vocab.txt" ]] || { echo "no BERT vocabulary: run --prepare to carry vocab.txt" >&2; exit 2; }
  LXTRAIN_VOCAB=$(cd "$wheels" && pwd)/vocab.txt  # for every run and test below, subprocesses included
  export LXTRAIN_VOCAB
fi

# 2. Environment, GPU tests and per-kernel timings.
"$python" - "$out" "$batch" "$steps" "$warm_steps" "$log_every" "$workers" "$*" <<'EOF'
import json, sys, torch
out, batch, steps, warm_steps, log_every, workers, arguments = sys.argv[1:]
info = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "batch": int(batch), "steps": int(steps),
        "warm_steps": int(warm_steps), "log_every": int(log_every), "workers": int(workers),
        "command": f"bench/gpu_pretrain.sh {arguments}".strip()}
for name in ("triton", "deepspeed", "transformers"):
    try:
        info[name] = __import__(name).__version__
    except Exception as error:
        info[name] = f"unavailable ({error})"
json.dump(info, open(f"{out}/environment.json", "w"), indent=2)
print(json.dumps(info))
EOF
command -v nvidia-smi >/dev/null && nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
if [[ -z "${SKIP_TESTS:-}" ]]; then
  log "tests: ${TESTS:-tests/test_kernels.py tests/test_gpu.py} ${TEST_ARGS:-} (GPU cases included when a GPU is present)"
  # shellcheck disable=SC2086  # word splitting of the file list and the extra arguments is intended
  timeout "$stage_timeout" "$python" -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_kernels.py tests/test_gpu.py} \
    ${TEST_ARGS:-} > "$out/test_kernels.txt" 2>&1 && log "tests passed" || log "tests FAILED: see test_kernels.txt"
fi
if [[ -z "${SKIP_KERNELS:-}" ]]; then
  log "per-kernel benchmark"
  timeout "$stage_timeout" "$python" bench/kernels.py --batch "$batch" --json "$out/kernels.json" > "$out/kernels.txt" 2>&1 \
    || log "bench/kernels.py FAILED: see kernels.txt"
fi

# 3. Synthetic corpus with enough sentences for every run (about 6.7 sentences per image).
corpus=$out/corpus
if [[ ! -f "$corpus/shards/train/index.json" ]]; then
  images=$(( (batch * (steps + 2)) / 5 + 64 ))
  log "synthetic corpus: $images images, 2048-d features"
  "$python" -m lxtrain.data.synthetic --out "$corpus" --images "$images" --feature-dim 2048 --shards --direct \
    --workers "$(( $(nproc) > 8 ? 8 : $(nproc) ))" > "$out/corpus.txt" 2>&1
fi

# 4. DeepSpeed config for world size 1: the reference zero2_bf16.json with the batch sizes set. Its
#    FusedAdam is JIT-built with nvcc: built once here, within the stage time limit, so that a missing
#    nvcc or a failed or slow build falls back to torch's fused AdamW for every run (recorded).
ds_config=$out/ds_zero2_bf16_world1.json
optimizer=deepspeed
if "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  # DeepSpeed's JIT builder parses TORCH_CUDA_ARCH_LIST as plain numbers and fails on the suffixed
  # entries (e.g. "9.0a") that some CUDA images set: build for this GPU's own compute capability.
  TORCH_CUDA_ARCH_LIST=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
  log "building DeepSpeed FusedAdam (JIT, nvcc)"
  if timeout "$stage_timeout" "$python" -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" \
      > "$out/fused_adam_build.txt" 2>&1; then
    log "FusedAdam built"
  else
    optimizer=torch
    log "FusedAdam build failed or timed out (see fused_adam_build.txt): torch fused AdamW stands in"
  fi
fi
"$python" - "$ds_config" "$batch" "$optimizer" "$out/environment.json" <<'EOF'
import json, sys, torch
path, batch, optimizer, environment = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
config = json.load(open("ds_configs/zero2_bf16.json"))
config.update(train_batch_size=batch, train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=1)
if torch.cuda.is_available() and optimizer == "torch":
    params = config["optimizer"]["params"]
    params.pop("bias_correction")  # torch's AdamW always corrects bias; the step costs the same
    params.update(torch_adam=True, fused=True)
json.dump(config, open(path, "w"), indent=2)
info = json.load(open(environment))
info["optimizer"] = "torch fused AdamW" if config["optimizer"]["params"].get("torch_adam") else "DeepSpeed Adam"
json.dump(info, open(environment, "w"), indent=2)
print("optimizer:", info["optimizer"])
EOF

# 5. HF baseline and lxtrain's model alone at the same batch, then the loader alone (before the full
#    runs: the ratios need them if time runs out; together they say where a step's time goes).
if [[ -z "${SKIP_HF:-}" && -z "${DRY_RUN:-}" ]]; then
  log "HF LxmertForPreTraining, then lxtrain's model (sdpa, fused): bf16 autocast, batch $batch"
  timeout "$stage_timeout" "$python" bench/gpu_pretrain.py hf --shards "$corpus/shards/train" --batch "$batch" \
    --steps "$(( steps < 30 ? steps : 30 ))" --record "$out/hf/record.json" > "$out/hf.txt" 2>&1 \
    || log "HF / model-alone timing FAILED: see hf.txt"
fi
if [[ -z "${DRY_RUN:-}" ]]; then
  for stage in 2 0; do
    log "lxtrain through DeepSpeed ZeRO-$stage, no loader, batch $batch"
    LXTRAIN_ATTENTION=sdpa timeout "$stage_timeout" "$python" bench/gpu_pretrain.py engine --shards "$corpus/shards/train" \
      --deepspeed-config "$ds_config" --batch "$batch" --steps "$(( steps < 30 ? steps : 30 ))" --zero-stage "$stage" \
      --record "$out/engine/zero$stage.json" > "$out/engine_zero$stage.txt" 2>&1 \
      || log "engine timing (ZeRO-$stage) FAILED: see engine_zero$stage.txt"
  done
fi
log "training loader alone: $workers workers, batch $batch"
timeout "$stage_timeout" "$python" bench/gpu_pretrain.py loader --shards "$corpus/shards/train" --batch "$batch" \
  --workers "$workers" --batches "$steps" --record "$out/loader/record.json" > "$out/loader.txt" 2>&1 \
  || log "loader timing FAILED: see loader.txt"

for backend in $backends; do
  run=$out/runs/$backend
  rm -rf "$run"
  log "pre-training, attention backend $backend: $steps steps at batch $batch"
  interpret=0  # a CPU dry run takes the fused path through Triton's interpreter (slow, but end to end)
  [[ -n "${DRY_RUN:-}" && "$backend" == fused ]] && ! "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" && interpret=1
  TRITON_INTERPRET=$interpret LXTRAIN_ATTENTION=$backend timeout "$stage_timeout" "$python" bench/gpu_pretrain.py pretrain --record "$run/record.json" -- \
    --deepspeed_config "$ds_config" --train-shards "$corpus/shards/train" --output-dir "$run" \
    --model "$model" --epochs 1 --max-steps "$steps" --log-every "$log_every" --save-every 1000000 \
    --num-workers "$workers" --no-export > "$out/pretrain_$backend.txt" 2>&1 \
    || log "pre-training with $backend FAILED: see pretrain_$backend.txt"
  rm -rf "$run/checkpoints"  # gigabytes of optimizer state nobody needs from a benchmark
done

# 6. Report.
"$python" bench/gpu_pretrain.py collect "$out" | tee -a "$out/run.log"
log "done: $out/results.md"
