#!/usr/bin/env bash
# Start a one-node Slurm cluster (Debian 12, Slurm 22.05) on this machine, as root and without
# systemd, for the tests that submit sweeps to Slurm. Idempotent: safe to run again; it restarts
# the Slurm daemons only if they are not running or slurm.conf changed.
set -euo pipefail

[ "$(id -u)" -eq 0 ] || { echo "slurm-up.sh: must run as root" >&2; exit 1; }

WAIT_S=${SLURM_UP_TIMEOUT:-60}
LOGDIR=/var/log/slurm
CONF=/etc/slurm/slurm.conf
PKGS=(slurmctld slurmd slurm-client munge)

log() { echo "[slurm-up] $*"; }
fail() {
  echo "[slurm-up] ERROR: $*" >&2
  sinfo -N -l >&2 || true
  scontrol show node "${NODE:-}" >&2 || true
  for f in "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" /var/log/munge/munged.log; do
    echo "===== $f" >&2; tail -n 50 "$f" >&2 2>/dev/null || true
  done
  exit 1
}

# ---------------------------------------------------------------- install ----
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing: ${missing[*]}"
  # Keep the packages' maintainer scripts from trying to start services
  # (there may be no systemd / init); we start the daemons ourselves below.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
fi

# ------------------------------------------------------------- node/conf ----
NODE=$(hostname -s)
# Both SlurmctldHost and NodeName must resolve; fall back to loopback if not.
ADDR_OPT=""
CTL_HOST="$NODE"
if ! getent hosts "$NODE" >/dev/null 2>&1; then
  log "hostname $NODE does not resolve; using 127.0.0.1 as its address"
  ADDR_OPT="NodeAddr=127.0.0.1"
  CTL_HOST="$NODE(127.0.0.1)"
fi

# e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
HW=$(slurmd -C | head -n1)
CPUS=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$HW")
MEM=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")
TPC=$(sed -n 's/.* ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$HW")
if [ "${TPC:-1}" -gt 1 ]; then
  # Hyper-threads: with CR_Core a 1-CPU job would take a whole core (2 CPUs).
  # Declare every logical CPU as a core so CR_Core packs one job per CPU.
  NODE_LINE="NodeName=$NODE CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM"
  SLURMD_PARAMS="SlurmdParameters=config_overrides"
else
  NODE_LINE="NodeName=$NODE ${HW#NodeName=* }"
  SLURMD_PARAMS=""
fi

mkdir -p /etc/slurm "$LOGDIR" /var/spool/slurmctld /var/spool/slurmd /run/slurm
NEW=$(mktemp)
cat > "$NEW" <<EOF
# Written by .ci/slurm-up.sh: a one-node cluster for the test suite
ClusterName=ci
SlurmctldHost=$CTL_HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
# Run the main/backfill schedulers every few s instead of 60/30 s, so jobs whose
# BeginTime passes (e.g. requeued jobs) start promptly.
SchedulerParameters=sched_interval=2,bf_interval=2
# A requeued job is held (Reason=BeginTime) for cred_expire s (default 120).
AuthInfo=cred_expire=10
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MaxArraySize=100001
MaxJobCount=200000
# keep finished jobs visible to squeue -t all / scontrol show job for 1 h
MinJobAge=3600
MailProg=/bin/true
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
$SLURMD_PARAMS
$NODE_LINE $ADDR_OPT State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
CONF_CHANGED=0
if ! cmp -s "$NEW" "$CONF"; then
  install -m 644 "$NEW" "$CONF"
  CONF_CHANGED=1
  log "wrote $CONF"
fi
rm -f "$NEW"

# ------------------------------------------------------------------ munge ----
if ! (munge -n | unmunge) >/dev/null 2>&1; then
  MUNGE_USER=root
  id munge >/dev/null 2>&1 && MUNGE_USER=munge
  mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    if [ -x /usr/sbin/mungekey ]; then /usr/sbin/mungekey -c -f -k /etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  fi
  chown -R "$MUNGE_USER:$MUNGE_USER" /etc/munge /var/lib/munge /var/log/munge /run/munge
  chmod 700 /etc/munge /var/lib/munge /var/log/munge
  chmod 755 /run/munge
  chmod 400 /etc/munge/munge.key
  rm -f /run/munge/munge.socket.2 /run/munge/munged.pid  # stale leftovers
  log "starting munged as $MUNGE_USER"
  if [ "$MUNGE_USER" = munge ]; then
    runuser -u munge -- /usr/sbin/munged
  else
    /usr/sbin/munged --force
  fi
  for _ in $(seq 50); do (munge -n | unmunge) >/dev/null 2>&1 && break; sleep 0.1; done
  (munge -n | unmunge) >/dev/null || fail "munge does not work"
fi

# ------------------------------------------------------------------ slurm ----
running() { # $1 = pidfile, $2 = process name
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ] &&
    ! grep -q '^State:.*Z' /proc/"$pid"/status 2>/dev/null   # not a zombie
}
stop_one() { # $1 = pidfile, $2 = process name
  if running "$1" "$2"; then
    kill "$(cat "$1")"
    for _ in $(seq 100); do running "$1" "$2" || break; sleep 0.1; done
  fi
}

if [ "$CONF_CHANGED" -eq 1 ]; then
  stop_one /run/slurm/slurmd.pid slurmd
  stop_one /run/slurm/slurmctld.pid slurmctld
fi
if ! running /run/slurm/slurmctld.pid slurmctld; then
  log "starting slurmctld"
  # daemonizes; keeps saved state (jobs) from earlier runs (-c would clear it)
  slurmctld || fail "slurmctld failed to start"
fi
if ! running /run/slurm/slurmd.pid slurmd; then
  log "starting slurmd"
  slurmd -N "$NODE" || fail "slurmd failed to start"  # daemonizes
fi

# ------------------------------------------------------------------- wait ----
state=""
for _ in $(seq "$WAIT_S"); do
  state=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1 || true)
  case "$state" in
    idle|mixed|allocated|completing)
      # after a restart the saved state may say idle before slurmd re-registers
      if running /run/slurm/slurmd.pid slurmd && scontrol ping 2>/dev/null | grep -q UP; then
        log "node $NODE is $state"; sinfo; exit 0
      fi ;;
    down*|drain*)  # e.g. left down from an earlier run
      scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 1
done

fail "node $NODE not idle after ${WAIT_S}s (state: '${state}')"
