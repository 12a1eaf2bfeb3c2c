#!/usr/bin/env bash
# Start the RelayMD console (`relaymd`, which hosts the orchestrator) in a tmux session on a login
# node, or attach to that session when it is already running. Detaching (C-b d) or losing the ssh
# connection leaves the orchestrator running; run this script again to get the console back.
#
# usage: relaymd-console.sh [-s NAME] [--detach] [--] [RELAYMD ARGS...]
#   -s, --session NAME  tmux session name (default: $RELAYMD_TMUX_SESSION, else "relaymd")
#   -d, --detach        start the session without attaching to it (e.g. from cron @reboot)
#   RELAYMD ARGS        passed to `relaymd` when the session is created, e.g. --config FILE
#
# One orchestrator per RELAYMD_HOME: a second one (another session, or the systemd unit in
# deploy/hpc/relaymd.service) is refused with a one-line error, which this script keeps on screen.
set -euo pipefail

prog=relaymd-console
session="${RELAYMD_TMUX_SESSION:-relaymd}"
detach=0

usage() {
  sed -n '6,10s/^# \{0,1\}//p' "$0"
}

while [ $# -gt 0 ]; do
  case "$1" in
    -s|--session)
      [ $# -ge 2 ] || { echo "$prog: $1 needs a session name" >&2; exit 2; }
      session=$2; shift 2 ;;
    --session=*) session=${1#--session=}; shift ;;
    -d|--detach) detach=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;  # the rest is for relaymd
  esac
done

[ -n "$session" ] || { echo "$prog: the session name is empty" >&2; exit 2; }
case "$session" in
  *[.:]*) echo "$prog: tmux session names cannot contain '.' or ':': $session" >&2; exit 2 ;;
esac

if ! command -v tmux >/dev/null 2>&1; then
  echo "$prog: tmux is not installed or not on PATH (install it, or run \`relaymd\` directly)" >&2
  exit 1
fi

attach() {
  if [ -n "${TMUX:-}" ]; then
    exec tmux switch-client -t "=$session"
  fi
  exec tmux attach-session -t "=$session"
}

if tmux has-session -t "=$session" 2>/dev/null; then
  if [ "$detach" = 1 ]; then
    echo "$prog: tmux session '$session' is already running; attach with: tmux attach -t $session"
    exit 0
  fi
  if [ $# -gt 0 ]; then
    echo "$prog: session '$session' is already running; ignoring the relaymd arguments: $*" >&2
  fi
  attach
fi

relaymd_bin=$(command -v relaymd 2>/dev/null || true)
if [ -z "$relaymd_bin" ]; then
  echo "$prog: relaymd is not on PATH (pip install it, e.g. into ~/.local, and add its bin to PATH)" >&2
  exit 1
fi

# tmux runs the session's command with the user's shell (which may be csh), so hand it one line
# of single-quoted words that starts bash: bash runs relaymd by its absolute path (the tmux server
# may have another PATH) and, when relaymd fails (a taken port, a database owned by another
# orchestrator, a bad config), keeps the pane open so the one-line error stays readable.
sq() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }
# shellcheck disable=SC2016  # expanded by the bash in the pane, not here
runner='status=0; "$@" || status=$?; if [ "$status" -ne 0 ]; then echo; echo "relaymd exited with status $status; press Enter to close"; read -r _; fi; exit "$status"'
cmd="$(sq "${BASH:-bash}") -c $(sq "$runner") $prog"
for word in "$relaymd_bin" "$@"; do
  cmd="$cmd $(sq "$word")"
done

if [ "$detach" = 1 ] || [ -n "${TMUX:-}" ]; then
  tmux new-session -d -s "$session" "$cmd"
  if [ "$detach" = 1 ]; then
    echo "$prog: started tmux session '$session'; attach with: tmux attach -t $session"
    exit 0
  fi
  attach
fi
exec tmux new-session -s "$session" "$cmd"
