#!/usr/bin/env bash
# Run one trainer rank for torchrun (--no-python) and pass its exit code through; when it is
# EXIT_REQUEUE (3), also create MARKER so the batch script knows to requeue. Needed because
# torchrun collapses any failing rank to its own exit code 1.
#
#   rank_exit.sh MARKER COMMAND [ARGS...]
#
# torchrun signals each rank's whole process group (this shell and the trainer). The traps keep
# this shell alive so it can report the trainer's code; the trainer handles the signal itself.
# (Trapped signals are reset to their defaults in the child, so the trainer's own handlers work.)
set -u
MARKER=$1
shift
trap ':' TERM USR1 INT HUP
"$@" &
CHILD=$!
while :; do
    wait "$CHILD"; RC=$?
    # > 128 with the child still alive: a trapped signal interrupted `wait`; keep waiting.
    if [ "$RC" -gt 128 ] && kill -0 "$CHILD" 2>/dev/null; then continue; fi
    break
done
# The child may have exited right after a signal cut `wait` short: bash still has its status.
if [ "$RC" -gt 128 ]; then wait "$CHILD"; RC=$?; fi
if [ "$RC" -eq 3 ]; then
    touch "$MARKER"
fi
exit "$RC"
