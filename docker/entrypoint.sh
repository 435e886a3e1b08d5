#!/usr/bin/env bash
# The image's entrypoint: one resumable training job.
#
#   docker run --gpus all --restart on-failure -v data:/data -v runs:/runs -v cache:/cache terrascale \
#       --config launch/configs/demo.yaml [key=value ...]
# runs
#   accelerate launch --config_file "$TERRASCALE_ACCELERATE_CONFIG" launch/train.py --config ... checkpoint.resume=auto
#
# A first argument that is a word (not an option or key=value) runs that terrascale command instead:
#   docker run ... terrascale universal /runs/job/checkpoints/step-000300
#
# The exit code is what lets `--restart on-failure` resume:
#   0        the job finished (or had nothing left to do): not restarted
#   1, 2...  a crash or an error: restarted, and checkpoint.resume=auto continues from the last complete checkpoint
#   143/130  stopped by SIGTERM/SIGINT (docker stop, host shutdown) after saving a checkpoint. Non-zero on purpose:
#            Docker does not restart a container someone stopped by hand, but does restart one that the host
#            shut down, and only if it "failed".
#
# Environment (defaults are the image's):
#   TERRASCALE_ACCELERATE_CONFIG  Accelerate config file (launch/configs/accelerate/one_gpu.yaml)
#   TERRASCALE_ACCELERATE         the accelerate executable (accelerate on PATH)
#   TERRASCALE_CLI                the terrascale executable, for commands (terrascale on PATH)
set -euo pipefail

APP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ACCELERATE=${TERRASCALE_ACCELERATE:-accelerate}
CONFIG_FILE=${TERRASCALE_ACCELERATE_CONFIG:-$APP_DIR/launch/configs/accelerate/one_gpu.yaml}
cd "$APP_DIR"

case "${1:-}" in
  "" | -* | *=*) ;;
  *) exec "${TERRASCALE_CLI:-terrascale}" "$@" ;;
esac

child=""
stop_signal=""
# shellcheck disable=SC2329  # invoked by the traps below
forward() {
  stop_signal=$1
  # To the whole process group: `accelerate launch` with one process does not pass signals on to the
  # training process it starts, and that process is the one that must save the checkpoint.
  if [ -n "$child" ]; then kill -s "$1" -- "-$child" 2>/dev/null || true; fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT

# setsid: its own process group, so that `forward` reaches every process of the job and nothing else.
setsid "$ACCELERATE" launch --config_file "$CONFIG_FILE" "$APP_DIR/launch/train.py" "$@" checkpoint.resume=auto &
child=$!

rc=0
while :; do
  wait "$child" && rc=0 || rc=$?
  # A trapped signal interrupts `wait` while the job is still running (saving): wait again.
  kill -0 "$child" 2>/dev/null || break
done
# The launcher can die of the signal before the training process has finished writing its checkpoint.
while kill -0 -- "-$child" 2>/dev/null; do sleep 1; done

if [ -n "$stop_signal" ]; then
  echo "terrascale entrypoint: stopped by SIG$stop_signal; the same command continues from the checkpoint" >&2
  exit $((128 + $(kill -l "$stop_signal")))
fi
exit "$rc"
