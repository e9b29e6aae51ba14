#!/usr/bin/env bash
# The learning-rate sweep behind the --model_size defaults (docs/results/learning-rates.md), in one call on one GPU:
# tiny, small and base on the trainer's true defaults at candidate rates and seeds, the batch rule, three-times-longer
# runs for stability, and the other defaults turned back. Runs go --jobs at a time (a run this small leaves a GPU
# waiting on Python); whatever finishes within SWEEP_SECONDS is kept, and the scores, held-out losses, last grids
# and log tails land in $OUT/adherence.tgz (read them back with --report_only):
#
#   OUT=/tmp/sweep bash examples/adherence_gpu.sh            # on the GPU machine; JOBS, SWEEP_SECONDS to change
#   ALLOW_CPU=1 SWEEP_ARGS='--max_train_steps 4 --eval_every 2' SWEEP_SECONDS=120 bash examples/adherence_gpu.sh  # dry run
#   python examples/adherence_curve.py --report_only --runs ... --output_dir UNPACKED   # the tables, here
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import diffusers, datasets" 2>/dev/null && [ -d .whl ]; then  # what the GPU machine lacks, as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 3
fi
python3 -c "import torch, diffusers, datasets, transformers, accelerate; import os; assert torch.cuda.is_available() or os.environ.get('ALLOW_CPU'), 'no GPU'; \
print(torch.__version__, diffusers.__version__, datasets.__version__, transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
  || exit 4
out="${OUT:-out}"
work="${WORK:-/tmp/adherence}"
mkdir -p "$out" "$work"
runs=(
  "base lr 1e-3 x3@0" "small lr 2e-3 x3@0" "tiny lr 2e-3 x3@0"
  "base lr 1e-3@1,2" "base lr 5e-4@0,1,2" "base lr 2e-3@0,1,2"
  "small lr 2e-3@1,2" "small lr 1e-3@0,1,2" "small lr 4e-3@0,1,2"
  "tiny lr 2e-3@1,2" "tiny lr 1e-3@0,1,2" "tiny lr 4e-3@0,1,2"
  "tiny batch 128 lr 2e-3@0" "tiny batch 128 lr 4e-3@0" "tiny batch 128 lr 8e-3@0"
  "tiny lr 1e-4@0" "small lr 1e-4@0" "base lr 1e-4@0"
  "tiny defaults, warm-up 500@0" "tiny defaults, no EMA@0" "base defaults, warm-up 500@0" "base defaults, no EMA@0"
  "base lr 4e-3@0" "tiny defaults, dropout 0.2@0" "small lr 5e-4@0" "tiny lr 5e-4@0"
)
if [ -n "${RUNS:-}" ]; then mapfile -t runs <<<"$RUNS"; fi  # one 'RECIPE@SEEDS' a line instead
printf '%s\n' "${runs[@]}" >"$work/runs.txt"
snapshot() {  # what is there so far, into $OUT/adherence.tgz, swapped in whole (the call may be cut at any moment)
  (cd "$work" && for run in */; do
    [ -f "$run/train.log" ] && tail -n 30 "$run/train.log" >"$run/train-tail.log"
    last=$(ls "$run"model/samples/epoch-*.png 2>/dev/null | tail -n 1)
    [ -n "$last" ] && cp "$last" "$run/last-grid.png"
    [ -f "$run/model/evaluation.jsonl" ] && cp "$run/model/evaluation.jsonl" "$run/evaluation.jsonl"
  done
  tar czf "$out/.adherence.tgz" runs.txt */scores*.json */val_loss.json */evaluation.jsonl */failed.txt \
    */train-tail.log */last-grid.png 2>/dev/null
  mv "$out/.adherence.tgz" "$out/adherence.tgz")
}
(while sleep 15; do snapshot; done) &
snapshotting=$!
PYTHONUNBUFFERED=1 timeout "${SWEEP_SECONDS:-530}" python3 examples/adherence_curve.py --runs "${runs[@]}" \
  --jobs "${JOBS:-14}" --output_dir "$work" ${SWEEP_ARGS:-} 2>&1 | grep -v -E "it/s\]|Loading|Writing" | tail -80
kill "$snapshotting" 2>/dev/null
snapshot
ls -la "$out"
