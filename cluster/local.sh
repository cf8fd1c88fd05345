#!/usr/bin/env bash
# Local Ray cluster for mvtec-ray: one head plus optional extra worker nodes on this machine.
#
#   cluster/local.sh start  [--workers N] [--num-cpus C] [--num-gpus G] [--port 6379]
#                           [--dashboard-port 8265] [--client-port P] [--temp-dir DIR]
#   cluster/local.sh status [--port 6379] [--temp-dir DIR]
#   cluster/local.sh stop   [--port 6379] [--temp-dir DIR] [--force] [--all]
#
# Every cluster gets its own Ray temp dir (default /tmp/ray_<port>) and every process it
# starts carries MVTEC_RAY_LOCAL_CLUSTER=<temp dir> in its environment. `stop` kills only
# the processes carrying that marker, so other Ray clusters on this machine (an embedded
# ray.init(), a test cluster on another port) survive. `stop --all` runs `ray stop --force`,
# which kills EVERY Ray process of this user.
#
# RAY_AUTH_MODE defaults to "disabled" (exported for head, workers, status), so a stale
# ~/.ray/auth_token left by an embedded ray.init() does not switch token auth on.
# AWS_* variables already exported in the calling shell are inherited by every Ray process
# (that is how workers get S3 credentials here); only their names are printed.
set -euo pipefail

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

cmd="${1:-}"; [ -n "$cmd" ] || usage; shift
case "$cmd" in -h|--help|help) usage 0 ;; esac
workers=0; num_cpus="$(nproc)"; num_gpus=""; port=6379; dash_port=8265
client_port=""; temp_dir=""; force=0; all=0
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers="$2"; shift 2 ;;
    --num-cpus) num_cpus="$2"; shift 2 ;;
    --num-gpus) num_gpus="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --dashboard-port) dash_port="$2"; shift 2 ;;
    --client-port) client_port="$2"; shift 2 ;;
    --temp-dir) temp_dir="$2"; shift 2 ;;
    --force) force=1; shift ;;
    --all) all=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "unknown option: $1" >&2; usage ;;
  esac
done

# Ray CLI: $RAY_BIN, else `ray` on PATH, else the repository's .venv.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${RAY_BIN:-}" ]; then
  if command -v ray >/dev/null 2>&1; then RAY_BIN="$(command -v ray)"; else RAY_BIN="$repo/.venv/bin/ray"; fi
fi
[ -x "$RAY_BIN" ] || { echo "ray CLI not found (set RAY_BIN)" >&2; exit 1; }
# Put that environment first on PATH so `python` in job entrypoints is the same interpreter.
export PATH="$(dirname "$RAY_BIN"):$PATH"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"

temp_dir="${temp_dir:-/tmp/ray_${port}}"   # keep it short: Unix socket paths live below it
marker="MVTEC_RAY_LOCAL_CLUSTER=$temp_dir"
state="$temp_dir/local_sh.env"

cluster_pids() {
  # Roots: processes whose environment carries the marker. Processes that rename
  # themselves (ray::IDLE workers, agents, dashboard modules) clobber /proc/PID/environ,
  # so their descendants are added from the process tree.
  local d roots=""
  for d in /proc/[0-9]*; do
    [ "${d#/proc/}" = "$$" ] && continue
    if { tr '\0' '\n' < "$d/environ" | grep -qxF "$marker"; } 2>/dev/null; then roots="$roots ${d#/proc/}"; fi
  done
  [ -n "$roots" ] || return 0
  ps -eo pid=,ppid=,stat= | awk -v roots="$roots" '
    BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
    $3 !~ /^Z/ { par[$1] = $2; all[$1] = 1 }
    END {
      do { grew = 0; for (p in all) if (!(p in keep) && (par[p] in keep)) { keep[p] = 1; grew = 1 } } while (grew)
      for (p in keep) if (p in all) print p
    }'
}

alive() {  # the given PIDs that still exist and are not zombies
  [ $# -gt 0 ] || return 0
  ps -o pid=,stat= -p "$(echo "$@" | tr ' ' ',')" 2>/dev/null | awk '$2 !~ /^Z/ { print $1 }' || true
}

gcs_address() { cat "$temp_dir/ray_current_cluster" 2>/dev/null || true; }

case "$cmd" in
start)
  if [ -n "$(cluster_pids)" ]; then
    echo "a cluster with temp dir $temp_dir is already running; run: $0 stop --port $port" >&2; exit 1
  fi
  # Ray Client's default 10001 would clash with a second cluster, and it must lie outside
  # the default worker port range 10002-19999.
  client_port="${client_port:-$((port + 20000))}"
  mkdir -p "$temp_dir"
  export MVTEC_RAY_LOCAL_CLUSTER="$temp_dir"
  aws_names="$(compgen -e | grep '^AWS_' | tr '\n' ' ' || true)"
  [ -n "$aws_names" ] && echo "AWS variables inherited by Ray processes: $aws_names"
  gpu_flag=(); [ -n "$num_gpus" ] && gpu_flag=(--num-gpus "$num_gpus")
  # --dashboard-agent-listen-port 0: a free port instead of the fixed 52365 (one per node).
  "$RAY_BIN" start --head --port "$port" --num-cpus "$num_cpus" "${gpu_flag[@]}" \
    --disable-usage-stats --include-dashboard true \
    --dashboard-host 127.0.0.1 --dashboard-port "$dash_port" \
    --ray-client-server-port "$client_port" --dashboard-agent-listen-port 0 \
    --temp-dir "$temp_dir" --log-style record >"$temp_dir/start_head.log" 2>&1 \
    || { tail -n 30 "$temp_dir/start_head.log" >&2; exit 1; }
  addr="$(gcs_address)"
  [ -n "$addr" ] || { echo "head started but $temp_dir/ray_current_cluster is missing" >&2; exit 1; }
  for i in $(seq 1 "$workers"); do
    # Node-manager/object-manager/agent ports default to free ones, so raylets on one host
    # do not collide; one log monitor per host is enough.
    "$RAY_BIN" start --address "$addr" --num-cpus "$num_cpus" \
      --dashboard-agent-listen-port 0 --include-log-monitor false \
      --temp-dir "$temp_dir" --log-style record >"$temp_dir/start_worker_$i.log" 2>&1 \
      || { tail -n 30 "$temp_dir/start_worker_$i.log" >&2; exit 1; }
  done
  printf 'RAY_ADDRESS=%s\nDASHBOARD_URL=%s\n' "$addr" "http://127.0.0.1:$dash_port" > "$state"
  echo "Ray cluster up: head + $workers worker node(s), $num_cpus CPU(s) each, temp dir $temp_dir"
  echo "  export RAY_ADDRESS=$addr     # for python pipelines/<job>.py --address auto"
  echo "  dashboard / job server: http://127.0.0.1:$dash_port"
  echo "  ray job submit --address http://127.0.0.1:$dash_port --working-dir . -- python pipelines/run.py --data ... --out ..."
  echo "  stop: $0 stop --port $port"
  ;;
status)
  addr="$(gcs_address)"
  if [ -z "$(cluster_pids)" ] || [ -z "$addr" ]; then echo "no local cluster with temp dir $temp_dir"; exit 1; fi
  [ -f "$state" ] && cat "$state"
  "$RAY_BIN" status --address "$addr"
  ;;
stop)
  if [ "$all" = 1 ]; then "$RAY_BIN" stop --force; exit 0; fi
  pids="$(cluster_pids | tr '\n' ' ')"
  if [ -z "${pids// /}" ]; then echo "no local cluster with temp dir $temp_dir"; exit 0; fi
  sig=TERM; [ "$force" = 1 ] && sig=KILL
  for n in $(seq 1 15); do
    # shellcheck disable=SC2086
    kill -s "$sig" $pids 2>/dev/null || true
    sleep 1
    # shellcheck disable=SC2086
    pids="$(printf '%s\n' $(alive $pids) $(cluster_pids) | sort -u | tr '\n' ' ')"
    [ -z "${pids// /}" ] && break
    [ "$n" -ge 5 ] && sig=KILL            # gcs_server ignores SIGTERM for a while
  done
  [ -z "${pids// /}" ] || { echo "processes still alive: $pids" >&2; exit 1; }
  rm -f "$state" "$temp_dir/ray_current_cluster"
  echo "stopped the local cluster with temp dir $temp_dir (logs kept in $temp_dir)"
  ;;
*) usage ;;
esac
