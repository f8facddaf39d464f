#!/usr/bin/env bash
# Stop the one-node Slurm cluster .ci/slurm-up.sh started. Idempotent.
# Cancels all remaining jobs first (set SLURM_DOWN_KEEP_JOBS=1 to leave them
# in slurmctld's saved state; their processes then keep running unmanaged).
set -uo pipefail

alive() { # pids of live (non-zombie) processes named exactly $1
  local p
  for p in $(pgrep -x "$1"); do
    grep -q '^State:.*Z' /proc/"$p"/status 2>/dev/null || echo "$p"
  done
}

if [ "${SLURM_DOWN_KEEP_JOBS:-0}" != 1 ] && [ -n "$(alive slurmctld)" ] \
   && timeout 10 scontrol ping 2>/dev/null | grep -q UP; then
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u)   # all non-finished jobs
  if [ -n "$jobs" ]; then
    echo "[slurm-down] cancelling jobs: $(echo $jobs)"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 20); do
      [ -z "$(timeout 10 squeue -h -o %A 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
fi

stop() { # $1 = process name
  local pids
  pids=$(alive "$1")
  if [ -z "$pids" ]; then echo "[slurm-down] $1 not running"; return; fi
  # shellcheck disable=SC2086
  kill $pids 2>/dev/null || true
  for _ in $(seq 100); do [ -z "$(alive "$1")" ] && break; sleep 0.1; done
  pids=$(alive "$1")
  if [ -n "$pids" ]; then
    echo "[slurm-down] $1 still running after 10s; sending SIGKILL" >&2
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
  fi
  echo "[slurm-down] $1 stopped"
}

stop slurmd
stop slurmctld
stop munged
rm -f /run/slurm/slurmd.pid /run/slurm/slurmctld.pid
exit 0
