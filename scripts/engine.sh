#!/usr/bin/env bash
# The local Docker engine for builds and tests: `start` uses an engine that already answers
# (a developer's laptop) or starts dockerd; `stop` ends only a dockerd that this script started.
#
#   scripts/engine.sh start|stop|status
#
# Its pidfile and log live in $SCHEDULER_KIT_RUN (default /run/scheduler-kit), never in git.
set -euo pipefail

RUN_DIR=${SCHEDULER_KIT_RUN:-/run/scheduler-kit}
PIDFILE=$RUN_DIR/dockerd.pid
LOG=$RUN_DIR/dockerd.log

answers() {
  # `docker version` asks the server too; the CLI may be newer than the engine, which is fine.
  docker version --format '{{.Server.APIVersion}}' >/dev/null 2>&1
}

our_pid() {
  # The pid in our pidfile, if that process is alive and is a dockerd.
  [ -s "$PIDFILE" ] || return 1
  local pid
  pid=$(cat "$PIDFILE")
  [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q dockerd || return 1
  echo "$pid"
}

start() {
  if answers; then
    return 0
  fi
  if our_pid >/dev/null; then
    echo "engine: dockerd $(our_pid) is running but does not answer; see $LOG" >&2
    exit 1
  fi
  mkdir -p "$RUN_DIR"
  rm -f "$PIDFILE"
  echo "engine: starting dockerd (log: $LOG)" >&2
  # No bridge and no iptables: every container uses host networking, and an iptables-managing
  # engine would set FORWARD to DROP, which cuts the test bed's bridge (see ENVIRONMENT.md).
  setsid dockerd --bridge=none --iptables=false --pidfile "$PIDFILE" \
    </dev/null >>"$LOG" 2>&1 &
  for _ in $(seq 1 120); do
    answers && return 0
    sleep 0.25
  done
  echo "engine: dockerd did not answer within 30 s; last lines of $LOG:" >&2
  tail -n 20 "$LOG" >&2
  exit 1
}

stop() {
  local pid
  pid=$(our_pid) || { rm -f "$PIDFILE"; return 0; }
  kill -TERM "$pid"
  for _ in $(seq 1 120); do
    [ -d "/proc/$pid" ] || break
    sleep 0.25
  done
  if [ -d "/proc/$pid" ]; then
    echo "engine: dockerd $pid did not stop within 30 s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
}

status() {
  if answers; then
    if pid=$(our_pid); then echo "engine: ours (dockerd $pid)"; else echo "engine: external"; fi
  else
    echo "engine: not answering"
    return 1
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
