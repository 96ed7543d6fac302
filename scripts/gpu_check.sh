#!/usr/bin/env bash
# On a machine with 2+ CUDA GPUs: the FSDP2 and DeepSpeed paths that CPU machines cannot run (Accelerate enables
# FSDP on GPUs only, and counts one process on CPU under DeepSpeed). For Accelerate and for hf_optim.Trainer: train 8 steps uninterrupted; train 4, save, resume in a
# new process and train 4 more; the final weights must match. Prints PASS / FAIL per check, exits 1 on a FAIL.
#
#   bash scripts/gpu_check.sh            # uses `python` as found; it must have a CUDA build of torch
#   PYTHON=/path/to/python bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${NGPU:-0}" -lt 2 ]; then
  echo "SKIP: needs 2 or more CUDA GPUs (found ${NGPU:-0}) and a CUDA build of torch"
  exit 0
fi
"$PY" -m pip install -q -e ".[transformers,accelerate]" || { echo "FAIL: install"; exit 1; }
OUT="$(mktemp -d -t hf_optim_gpu_check.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT
CONFIG="$OUT/fsdp2.yaml"
cat > "$CONFIG" <<EOF
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
mixed_precision: "no"
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: GPT2Block
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_reshard_after_forward: true
EOF
LAUNCH=("$PY" -m accelerate.commands.launch --config_file "$CONFIG" --main_process_port 0)
status=0
check() {  # check NAME: full, first, resume, then compare
  local name=$1 log="$OUT/$1.log"
  for mode in full first resume; do
    if ! "${LAUNCH[@]}" scripts/gpu_check_fsdp.py "$name" "$OUT" "$mode" >>"$log" 2>&1; then
      echo "FAIL: $name FSDP2 $mode run (log: $log)"; tail -20 "$log"; status=1; return
    fi
  done
  if "$PY" - "$OUT/${name}_full.safetensors" "$OUT/${name}_resume.safetensors" <<'PYEOF'
import sys, torch
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys() and a, "different parameters"
worst = max((x - b[k]).abs().max().item() for k, x in a.items())
print(f"  max |difference| = {worst:.3e} over {len(a)} tensors")
sys.exit(0 if all(torch.equal(x, b[k]) for k, x in a.items()) else 1)
PYEOF
  then echo "PASS: $name FSDP2 save -> resume -> same weights"
  else echo "FAIL: $name FSDP2 resume differs from the uninterrupted run"; status=1
  fi
  if ls "$OUT"/*ckpt*/optimizer.sharded.json "$OUT"/trainer/checkpoint-*/optimizer.sharded.json >/dev/null 2>&1; then
    echo "PASS: $name wrote sharded safetensors optimizer state"
  fi
}
check accelerate
check trainer

# hf_optim.Trainer under DeepSpeed ZeRO-2 and ZeRO-3: safetensors ZeRO state, resumed (to fp32 rounding: the
# resumed run's reductions are the same, but DeepSpeed re-creates its buffers)
"$PY" -m pip install -q "deepspeed>=0.19.8" || { echo "FAIL: install deepspeed"; exit 1; }
for stage in 2 3; do
  log="$OUT/deepspeed_$stage.log"; ok=1
  for mode in full first resume; do
    if ! "$PY" -m torch.distributed.run --nproc_per_node 2 scripts/gpu_check_deepspeed.py "$OUT/ds$stage" "$mode" \
        "$stage" >>"$log" 2>&1; then
      echo "FAIL: trainer DeepSpeed ZeRO-$stage $mode run (log: $log)"; tail -20 "$log"; status=1; ok=0; break
    fi
  done
  [ $ok = 1 ] || continue
  if "$PY" - "$OUT/ds$stage/deepspeed_full.safetensors" "$OUT/ds$stage/deepspeed_resume.safetensors" <<'PYEOF'
import sys, torch
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys() and a, "different parameters"
worst = max((x - b[k]).abs().max().item() for k, x in a.items())
print(f"  max |difference| = {worst:.3e} over {len(a)} tensors")
sys.exit(0 if worst < 1e-5 else 1)
PYEOF
  then echo "PASS: trainer DeepSpeed ZeRO-$stage save (safetensors, no global_step pickles) -> resume -> same weights"
  else echo "FAIL: trainer DeepSpeed ZeRO-$stage resume differs from the uninterrupted run"; status=1
  fi
done
exit $status
