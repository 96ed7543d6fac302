#!/usr/bin/env bash
# hf_optim end to end: Trainer with optim="adamw_hf" and a cosine schedule, checkpoints (optimizer.safetensors +
# scheduler.json) pushed to a Hub, the run "interrupted", resumed from the Hub in a new process, and checked
# bit for bit against an uninterrupted run. Then a learning-rate plot and a summary.
#
#   scripts/demo.sh                  # local Hub server (python -m hf_optim.hub_server), nothing leaves the machine
#   HF_ENDPOINT=https://huggingface.co HF_TOKEN=hf_... [DEMO_REPO=user/name] scripts/demo.sh   # a real Hub
#
# Knobs (environment): STEPS (160), STOP_AT (70), OUT (outputs/demo, relative to the repository root; emptied
# first, so it must be new, empty, under outputs/ or a previous demo's), DEMO_REPO (<user>/hf-optim-demo-<time>).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd -P)"
cd "$ROOT"

OUT="${OUT-outputs/demo}"
MARKER=".hf_optim-demo-output"   # written into OUT: a later run may empty that folder again

# Refuse to empty OUT unless it is certainly the demo's: new or empty, inside the repository's outputs/, or
# holding the marker of an earlier run.
refuse() { echo "demo.sh: refusing to delete OUT=$OUT: $*" >&2; exit 1; }
[ -n "$OUT" ] || refuse "it is empty"
if [ -e "$OUT" ] || [ -L "$OUT" ]; then
  [ -d "$OUT" ] || refuse "it is not a directory"
  resolved="$(cd "$OUT" && pwd -P)"
  case "$resolved" in
    / | "$ROOT" | "$ROOT"/outputs) refuse "it is $resolved" ;;
  esac
  if [ ! -f "$resolved/$MARKER" ] && [ -n "$(ls -A "$resolved")" ]; then
    case "$resolved/" in
      "$ROOT"/outputs/*) ;;   # the repository's git-ignored outputs (e.g. a demo run older than the marker)
      *) refuse "$resolved is not empty and holds no $MARKER (not written by this demo); choose another OUT" ;;
    esac
  fi
  rm -rf "$OUT"
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
touch "$OUT/$MARKER"

. scripts/_venv.sh dev   # creates/updates .venv, activates it

STEPS="${STEPS:-160}"
STOP_AT="${STOP_AT:-70}"
WARMUP=16
LR=2e-3
export HF_HUB_DISABLE_TELEMETRY=1

SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# run_quiet LOG PATTERN CMD...: run CMD with its output in LOG, show only the lines matching PATTERN
run_quiet() {
  local log="$1" pattern="$2"; shift 2
  if ! "$@" >"$log" 2>&1; then tail -n 40 "$log"; echo "failed: $* (log: $log)"; exit 1; fi
  grep -E "$pattern" "$log" || true
}

if [ -z "${HF_ENDPOINT:-}" ]; then
  say "Starting the local Hub server (root: $OUT/hub)"
  python -m hf_optim.hub_server --root "$OUT/hub" --lfs-extensions .safetensors >"$OUT/hub.url" 2>"$OUT/hub.log" &
  SERVER_PID=$!
  for _ in $(seq 1 300); do
    [ -s "$OUT/hub.url" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$OUT/hub.log"; echo "the local Hub server failed to start"; exit 1; }
    sleep 0.2
  done
  [ -s "$OUT/hub.url" ] || { echo "the local Hub server did not start in time"; exit 1; }
  export HF_ENDPOINT="$(head -n 1 "$OUT/hub.url")"
  export HF_TOKEN="${HF_TOKEN:-hf_local_demo_token}"
  export HF_HUB_DISABLE_XET=1     # the local server speaks Git LFS, not xet
  export HF_HOME="$OUT/hf_home"   # keep the demo's cache out of the user's
  HUB_KIND="local Hub server at $HF_ENDPOINT"
else
  [ -n "${HF_TOKEN:-}" ] || { echo "HF_ENDPOINT is set: also set HF_TOKEN (write access)"; exit 1; }
  HUB_KIND="Hub at $HF_ENDPOINT"
fi
HUB_USER="$(python -c 'from huggingface_hub import whoami; print(whoami()["name"])')"
REPO="${DEMO_REPO:-$HUB_USER/hf-optim-demo-$(date +%Y%m%d-%H%M%S)}"
echo "Hub: $HUB_KIND, user $HUB_USER, repo $REPO"

COMMON=(
  --optim adamw_hf --lr_scheduler_type cosine --learning_rate "$LR" --warmup_steps "$WARMUP" --weight_decay 0.01
  --max_steps "$STEPS" --save_steps 35 --logging_steps 10 --per_device_train_batch_size 16 --seed 42
  --use_cpu --report_to none --dataloader_num_workers 0
)

say "1/4 Uninterrupted reference run: $STEPS steps"
run_quiet "$OUT/uninterrupted.log" "summary" \
  python scripts/train_trainer.py --output_dir "$OUT/uninterrupted" "${COMMON[@]}" --do_eval

say "2/4 Same run, checkpoints pushed to $REPO (hub_strategy=checkpoint), interrupted after step $STOP_AT"
run_quiet "$OUT/first.log" "summary" \
  python scripts/train_trainer.py --output_dir "$OUT/first" "${COMMON[@]}" --stop_after_step "$STOP_AT" \
  --push_to_hub --hub_model_id "$REPO" --hub_strategy checkpoint --hub_always_push true --hub_private_repo true

say "3/4 New process, empty cache: resume from hf://$REPO/last-checkpoint"
run_quiet "$OUT/resumed.log" "Resuming from|Loaded optimizer|Resuming training|summary" \
  env HF_HOME="$OUT/hf_home_resume" python scripts/train_trainer.py --output_dir "$OUT/resumed" "${COMMON[@]}" \
  --resume_from_checkpoint "hf://$REPO/last-checkpoint" --do_eval

say "4/4 Checks, plot, summary"
hf-optim plot cosine --num-warmup-steps "$WARMUP" --num-training-steps "$STEPS" --lr "$LR" \
  --output "$OUT/lr_schedule.png" >/dev/null
python - "$OUT" "$REPO" "$STOP_AT" "$HUB_KIND" <<'EOF'
import json, os, sys

import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file

out, repo, stop_at, hub_kind = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ref, res = (load_file(os.path.join(out, d, "model.safetensors")) for d in ("uninterrupted", "resumed"))
same = ref.keys() == res.keys() and all(torch.equal(ref[k], res[k]) for k in ref)


def history(d):
    with open(os.path.join(out, d, "trainer_state.json")) as f:
        return json.load(f)["log_history"]


lrs = [{e["step"]: e["learning_rate"] for e in history(d) if "learning_rate" in e} for d in ("uninterrupted", "resumed")]
evals = [next((e["eval_accuracy"] for e in history(d) if "eval_accuracy" in e), None) for d in ("uninterrupted", "resumed")]
losses = [e["loss"] for e in history("resumed") if "loss" in e]
api = HfApi()
pushed = sorted(f for f in api.list_repo_files(repo) if f.startswith("last-checkpoint/"))
with open(api.hf_hub_download(repo, "last-checkpoint/trainer_state.json")) as f:
    pushed_step = json.load(f)["global_step"]
ckpt = os.path.join(out, "first", f"checkpoint-{stop_at}")
print(f"""
Summary
  Hub                    {hub_kind}
  repo                   {repo}
  pushed checkpoint      {', '.join(p.removeprefix('last-checkpoint/') for p in pushed)}
  pickled optimizer      {'none' if not any(p.endswith(('optimizer.pt', 'scheduler.pt')) for p in pushed) else 'PRESENT'}
  interrupted at step    {stop_at}  (local copy: {ckpt})
  resumed in new process hf://{repo}/last-checkpoint (step {pushed_step})
  loss (logged)          {losses[0]:.3f} -> {losses[-1]:.3f}; eval accuracy {evals[1]} (uninterrupted: {evals[0]})
  final weights          {'bit-for-bit EQUAL' if same else 'DIFFERENT'} to the uninterrupted run ({len(ref)} tensors)
  learning rates         {'equal' if lrs[0] == lrs[1] else 'DIFFERENT'} at all {len(lrs[0])} logged steps
  files                  {out}/resumed/model.safetensors, {out}/lr_schedule.png, logs in {out}/*.log
""")
sys.exit(0 if same and lrs[0] == lrs[1] else 1)
EOF
