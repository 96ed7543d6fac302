#!/usr/bin/env bash
# hf_optim end to end: Trainer with optim="adamw_hf" and a cosine schedule, checkpoints (optimizer.safetensors +
# scheduler.json) pushed to a Hub, the run "interrupted", resumed from the Hub in a new process, and checked
# bit for bit and step by step against an uninterrupted run. Then a plot of both runs and a summary.
#
#   scripts/demo.sh                  # local Hub server (python -m hf_optim.hub_server), nothing leaves the machine
#   HF_ENDPOINT=https://huggingface.co HF_TOKEN=hf_... [DEMO_REPO=user/name] scripts/demo.sh   # a real Hub
#
# Knobs (environment): STEPS (160), STOP_AT (70), WARMUP (STEPS / 10), OUT (outputs/demo, relative to the
# repository root; emptied first, so it must be new, empty, under outputs/ or a previous demo's), DEMO_REPO
# (<user>/hf-optim-demo-<time>).
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

START=$SECONDS
TTY=0; [ -t 1 ] && TTY=1
if [ "$TTY" = 1 ]; then say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }; else say() { printf '\n== %s\n' "$*"; }; fi
note() { printf '   %s\n' "$*"; }

say "Python environment (.venv)"
if [ -x .venv/bin/python ]; then
  note "checking .venv (installs hf_optim[dev] again only if pyproject.toml changed: then about 10-40 s) ..."
else
  note "creating .venv and installing torch 2.13 + hf_optim[dev] (about 40 s to a few minutes) ..."
fi
t=$SECONDS
. scripts/_venv.sh dev   # creates/updates .venv, activates it
note ".venv ready ($((SECONDS - t)) s)"

STEPS="${STEPS:-160}"
STOP_AT="${STOP_AT:-70}"
WARMUP="${WARMUP:-$((STEPS / 10))}"
LR=2e-3
export HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
# One thread per process: this model is too small to gain from more (on 2 busy cores, 2 threads took 2-3x the
# time). Every run must use the same number: another thread count rounds some sums differently.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

# progress: read a training log on stdin; show its "step N/M: loss ..., learning rate ..." lines as one live
# line on a terminal (a few plain lines otherwise, e.g. in CI) and the other lines worth seeing as they are.
progress() {
  local line msg step total width=24 shown=0 every
  while IFS= read -r line; do
    msg="${line#* train_trainer: }"
    case "$line" in
      *" train_trainer: step "[0-9]*/[0-9]*:*)
        step="${msg#step }"; step="${step%%/*}"
        total="${msg#step */}"; total="${total%%:*}"
        if [ "$TTY" = 1 ]; then
          local filled=$((step * width / total)) bar
          printf -v bar "%*s" "$filled" ""; bar="${bar// /#}"
          printf '\r\033[K   [%-*s] %s' "$width" "$bar" "$msg"
          shown=1
        else
          every=$(((total + 3) / 4))
          [ $((step % every)) = 0 ] && note "$msg"
        fi
        continue ;;
      *" train_trainer: stopped after"* | *" train_trainer: schedule from"* | *"Resuming from "* | \
      *"Loaded optimizer"* | *" WARNING "* | *Error*) ;;
      *) continue ;;
    esac
    [ "$shown" = 1 ] && { printf '\n'; shown=0; }
    case "$line" in *" INFO "*) msg="${line#* INFO *: }" ;; esac
    msg="${msg% (downloaded to *}"; msg="${msg% from /*}"   # cache paths: in the log
    note "$msg"
  done
  [ "$shown" = 1 ] && printf '\n'
  return 0
}

# run_stage LOG CMD...: run CMD with all its output in LOG, its progress on the terminal (see progress)
run_stage() {
  local log="$1" t=$SECONDS; shift
  if ! "$@" 2>&1 | tee "$log" | progress; then
    tail -n 40 "$log"; echo "failed: $* (log: $log)"; exit 1
  fi
  note "done in $((SECONDS - t)) s (log: ${log#"$ROOT"/})"
  STAGE_TIMES+=("$((SECONDS - t))")
}
STAGE_TIMES=()

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
note "$HUB_KIND, user $HUB_USER, repo $REPO"

# The schedule is given to the first two runs only: the resumed run reads it from the checkpoint's scheduler.json.
SCHEDULE=(--lr_scheduler_type cosine --warmup_steps "$WARMUP" --max_steps "$STEPS")
COMMON=(
  --optim adamw_hf --learning_rate "$LR" --weight_decay 0.01 --save_steps 35 --logging_steps 1
  --per_device_train_batch_size 16 --seed 42 --use_cpu --report_to none --dataloader_num_workers 0
  --disable_tqdm true
)

say "1/4 Uninterrupted reference run: $STEPS steps"
run_stage "$OUT/uninterrupted.log" \
  python scripts/train_trainer.py --output_dir "$OUT/uninterrupted" "${SCHEDULE[@]}" "${COMMON[@]}" \
  --step_log "$OUT/uninterrupted/steps.jsonl"

say "2/4 Same run, checkpoints pushed to $REPO (hub_strategy=checkpoint), interrupted after step $STOP_AT"
run_stage "$OUT/first.log" \
  python scripts/train_trainer.py --output_dir "$OUT/first" "${SCHEDULE[@]}" "${COMMON[@]}" \
  --step_log "$OUT/first/steps.jsonl" --stop_after_step "$STOP_AT" \
  --push_to_hub --hub_model_id "$REPO" --hub_strategy checkpoint --hub_always_push true --hub_private_repo true

say "3/4 New process, empty cache: resume from hf://$REPO/last-checkpoint (schedule from its scheduler.json)"
run_stage "$OUT/resumed.log" \
  env HF_HOME="$OUT/hf_home_resume" python scripts/train_trainer.py --output_dir "$OUT/resumed" "${COMMON[@]}" \
  --step_log "$OUT/resumed/steps.jsonl" --resume_from_checkpoint "hf://$REPO/last-checkpoint"

say "4/4 Checks, plot, summary"
t=$SECONDS
status=0
python scripts/demo_report.py "$OUT" --repo "$REPO" --hub "$HUB_KIND" --stop-at "$STOP_AT" \
  --schedule "cosine:$WARMUP:$STEPS:$LR" || status=$?
printf '  %-22s %s s (runs %s s, checks and plot %s s)\n' "total time" "$((SECONDS - START))" \
  "$(IFS=+; echo "${STAGE_TIMES[*]}")" "$((SECONDS - t))"
exit "$status"
