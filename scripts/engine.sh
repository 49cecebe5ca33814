#!/usr/bin/env bash
# The local Docker engine for builds and tests: `start` uses an engine that already answers
# (a developer's laptop) or starts dockerd; `stop` ends only a dockerd that this script started.
#
#   scripts/engine.sh start|stop|status
#
# Its pidfile and log live in $ENGINE_RUN_DIR (default /run/scheduler-kit), never in git.
# ENGINE_OWNER=TOKEN: `start` records TOKEN as the owner of a dockerd it starts, and `stop`
# then ends the engine only if TOKEN started it (so `make test` stops only its own engine,
# never one that `make cluster-up` or a developer started before).
# With DOCKER_HOST=unix:///some/other.sock, a second engine starts there with its exec-root in
# ENGINE_RUN_DIR and its data in ENGINE_DATA_ROOT (a cold run beside a machine's engine).
set -euo pipefail

RUN_DIR=${ENGINE_RUN_DIR:-/run/scheduler-kit}
PIDFILE=$RUN_DIR/dockerd.pid
OWNERFILE=$RUN_DIR/dockerd.owner
LOG=$RUN_DIR/dockerd.log
DAEMON_ARGS=()
case "${DOCKER_HOST:-}" in
  "" | unix:///var/run/docker.sock | unix:///run/docker.sock) ;;
  unix://*) DAEMON_ARGS=(-H "$DOCKER_HOST" --exec-root "$RUN_DIR/exec"
                         --data-root "${ENGINE_DATA_ROOT:?set it for an engine on $DOCKER_HOST}") ;;
  *) ;;  # a remote engine: only used, never started here
esac

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
  mkdir -p "$RUN_DIR"
  # Two `make test` at once: the second waits here, then finds the first one's engine.
  exec 9>"$RUN_DIR/engine.lock"
  flock 9
  if answers; then
    return 0
  fi
  if our_pid >/dev/null; then
    echo "engine: dockerd $(our_pid) is running but does not answer; see $LOG" >&2
    exit 1
  fi
  rm -f "$PIDFILE" "$OWNERFILE"
  if [ -n "${ENGINE_OWNER:-}" ]; then echo "$ENGINE_OWNER" >"$OWNERFILE"; fi
  echo "engine: starting dockerd (log: $LOG)" >&2
  # No bridge and no iptables: every container uses host networking, and an iptables-managing
  # engine would set FORWARD to DROP, which cuts the test bed's bridge (see ENVIRONMENT.md).
  setsid dockerd --bridge=none --iptables=false --pidfile "$PIDFILE" "${DAEMON_ARGS[@]}" \
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
  if [ -n "${ENGINE_OWNER:-}" ] && [ "$(cat "$OWNERFILE" 2>/dev/null)" != "$ENGINE_OWNER" ]; then
    return 0  # not started by this owner: someone else's engine stays
  fi
  pid=$(our_pid) || { rm -f "$PIDFILE" "$OWNERFILE"; return 0; }
  kill -TERM "$pid"
  for _ in $(seq 1 120); do
    [ -d "/proc/$pid" ] || break
    sleep 0.25
  done
  if [ -d "/proc/$pid" ]; then
    echo "engine: dockerd $pid did not stop within 30 s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE" "$OWNERFILE"
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
