#!/usr/bin/env bash
# What every cluster node runs, for both cluster files (ray-cluster.yaml, ray-cluster-onprem.yaml).
# Run from the project folder the launcher syncs to each node (~/bagnet-toolkit):
#
#   scripts/cluster-node.sh setup [--results ROOT]   install the project, write the node env, check token, storage, GPU
#   scripts/cluster-node.sh check-gpu                stop here if this node should have a usable GPU and has none
#   scripts/cluster-node.sh ray start ARGS...        stop this node's Ray, then start it with the project's settings
#   scripts/cluster-node.sh ray stop                 stop this node's Ray only (its temp dir's processes)
#   scripts/cluster-node.sh ray ARGS...              any other `ray` command, in the node's environment
#   scripts/cluster-node.sh stop-cluster             on the head: stop Ray on every worker, then on the head
#   scripts/cluster-node.sh python ARGS...           the project's interpreter (e.g. `python -m pip install ...`)
#
# Node settings (environment, or ~/.bagnet/node.env which `setup` writes and every later step reads):
#   BAGNET_RESULTS      the shared results root (NFS path or s3://...), on every Ray process of the node
#   BAGNET_NODE_PYTHON  an interpreter that already has the project installed: `setup` installs nothing
#                       (default: the project's .venv, made by scripts/install.sh)
#   BAGNET_EXPECT_GPU   1: this node must have a usable GPU; 0: don't check; unset: check when the machine
#                       has an NVIDIA GPU on its PCI bus
#   BAGNET_RAY_PORT, BAGNET_DASHBOARD_PORT, BAGNET_OBJECT_MANAGER_PORT   6379, 8265, 8076 by default
#   BAGNET_RAY_START_ARGS  extra `ray start` options for this node (e.g. --num-cpus=8)
# Credentials for an S3-compatible store go in ~/.bagnet/secrets.env (mode 0600, KEY=value lines), never on a
# command line; AWS nodes use their instance profile instead.
set -euo pipefail
cd "$(dirname "$0")/.."

BAGNET_DIR="$HOME/.bagnet"
NODE_ENV="$BAGNET_DIR/node.env"
SECRETS_ENV="$BAGNET_DIR/secrets.env"
for file in "$NODE_ENV" "$SECRETS_ENV"; do
  if [ -f "$file" ]; then set -a; . "$file"; set +a; fi
done
PY="${BAGNET_NODE_PYTHON:-$PWD/.venv/bin/python}"
RAY_TEMP="${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray"   # where Ray keeps this node's sessions (Ray's own rule)

die() { echo "cluster-node.sh: $*" >&2; exit 1; }

node_python() {
  [ -x "$PY" ] || die "no Python environment at $PY: run \`scripts/cluster-node.sh setup\` (or set BAGNET_NODE_PYTHON)"
  echo "$PY"
}

# The token file is a password to the cluster: readable by its owner only.
secure_token() {
  local token="$HOME/.ray/auth_token"
  [ -f "$token" ] || die "$token is missing: run \`ray get-auth-token --generate\` where you run \`ray up\` (file_mounts copies it)"
  chmod 600 "$token"
  if [ -f "$SECRETS_ENV" ]; then chmod 600 "$SECRETS_ENV"; fi
}

setup() {
  local results="${BAGNET_RESULTS:-}"
  if [ "${1:-}" = "--results" ]; then results="${2:-}"; fi
  if [ -n "${BAGNET_NODE_PYTHON:-}" ]; then
    echo "cluster-node.sh: using the installed environment $BAGNET_NODE_PYTHON (BAGNET_NODE_PYTHON)"
  else
    scripts/install.sh   # the README's install: ./.venv with the tested torch/torchvision pair
  fi
  secure_token
  mkdir -p "$BAGNET_DIR" && chmod 700 "$BAGNET_DIR"
  (umask 077 && printf 'BAGNET_RESULTS=%s\n' "$results" > "$NODE_ENV.tmp" && mv "$NODE_ENV.tmp" "$NODE_ENV")
  # Fail `ray up` on a node that cannot write the shared root or use its GPU, not the first job.
  "$(node_python)" -m cluster.runtime_env --check-storage "$results"
  check_gpu
}

check_gpu() {
  "$(node_python)" -m cluster.runtime_env --check-gpu
}

# PIDs of this node's Ray: every process naming its temp dir, and their descendants (Ray's workers rename
# themselves, but stay children of the raylet).
node_ray_pids() {
  local roots
  # the pattern comes from a file: on grep's own command line it would match grep itself
  roots=$(grep -l -s -a -F -f <(printf '%s/\n' "$RAY_TEMP") /proc/[0-9]*/cmdline | cut -d/ -f3 || true)
  [ -n "$roots" ] || return 0
  ps -e -o pid=,ppid= | awk -v roots="$roots" '
    BEGIN { n = split(roots, r, "\n"); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
    { parent[$1] = $2 }
    END { do { changed = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 } } while (changed)
          for (p in keep) print p }'
}

stop_ray() {
  local pids
  pids=$(node_ray_pids)
  [ -n "$pids" ] || { echo "cluster-node.sh: no Ray running under $RAY_TEMP"; return 0; }
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 20); do
    pids=$(node_ray_pids)
    [ -n "$pids" ] || { echo "cluster-node.sh: stopped Ray under $RAY_TEMP"; return 0; }
    sleep 0.5
  done
  kill -KILL $pids 2>/dev/null || true
  echo "cluster-node.sh: killed Ray under $RAY_TEMP"
}

run_ray() {
  local py bin
  py=$(node_python)
  bin=$(dirname "$py")
  export PATH="$bin:$PATH"          # `python` in a job's entrypoint is the project's interpreter
  export RAY_AUTH_MODE=token        # every node requires the cluster's token (~/.ray/auth_token)
  export RAY_USAGE_STATS_ENABLED=0
  case "${1:-}" in
    stop) stop_ray ;;
    start)
      shift
      stop_ray
      secure_token
      # --temp-dir: a worker otherwise takes the head's, and `ray stop` here finds a node by its temp dir
      local args=(--disable-usage-stats --temp-dir="$RAY_TEMP") arg
      local head=0
      for arg in "$@"; do [ "$arg" = "--head" ] && head=1; done
      if [ "$head" = 1 ]; then
        # The dashboard (and job API) listens on the head's loopback only: reach it with `ray dashboard`.
        args+=(--port="${BAGNET_RAY_PORT:-6379}" --dashboard-host=127.0.0.1 --dashboard-port="${BAGNET_DASHBOARD_PORT:-8265}")
      fi
      args+=(--object-manager-port="${BAGNET_OBJECT_MANAGER_PORT:-8076}")
      for arg in "$@"; do
        # a worker's `--address=<head ip>`: the head's GCS port is the node setting
        if [[ "$arg" == --address=* && "$arg" != *:* ]]; then arg="$arg:${BAGNET_RAY_PORT:-6379}"; fi
        args+=("$arg")
      done
      if [ -n "${SSH_CONNECTION:-}" ] && [ -z "${BAGNET_NODE_IP:-}" ]; then
        BAGNET_NODE_IP=$(echo "$SSH_CONNECTION" | awk '{print $3}')   # the address the launcher reached us on
      fi
      if [ -n "${BAGNET_NODE_IP:-}" ]; then args+=(--node-ip-address="$BAGNET_NODE_IP"); fi
      ulimit -n 65536 2>/dev/null || true
      # A busy machine can miss the raylet's start-up waits (its agents' port files): try again.
      local attempt
      for attempt in 1 2 3; do
        # shellcheck disable=SC2086  # BAGNET_RAY_START_ARGS is a list of options
        if "$bin/ray" start "${args[@]}" ${BAGNET_RAY_START_ARGS:-}; then return 0; fi
        echo "cluster-node.sh: ray start failed (attempt $attempt of 3); logs: $RAY_TEMP/session_latest/logs" >&2
        stop_ray
        sleep $((5 * attempt))
      done
      die "ray start failed 3 times; logs: $RAY_TEMP/session_latest/logs"
      ;;
    *) exec "$bin/ray" "$@" ;;
  esac
}

# On the head: the launcher's `ray down` stops Ray on the head only when `ray` is on the login shell's
# PATH, and the local provider leaves workers running. This stops every worker, then the head.
stop_cluster() {
  local config="$HOME/ray_bootstrap_config.yaml" key="$HOME/ray_bootstrap_key.pem" user ip
  [ -f "$config" ] || die "$config not found: run stop-cluster on the head (ray exec <cluster file> ...)"
  user=$("$(node_python)" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["auth"]["ssh_user"])' "$config")
  for ip in $("$(node_python)" -c 'import sys, yaml; print(*yaml.safe_load(open(sys.argv[1]))["provider"].get("worker_ips", []))' "$config"); do
    echo "cluster-node.sh: stopping Ray on worker $ip"
    ssh -i "$key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes \
        -o ConnectTimeout=20 "$user@$ip" "bash --login -c 'cd ~/bagnet-toolkit && scripts/cluster-node.sh ray stop'" \
      || echo "cluster-node.sh: could not stop Ray on $ip (is it up?)" >&2
  done
  run_ray stop
}

case "${1:-}" in
  setup) shift; setup "$@" ;;
  check-gpu) check_gpu ;;
  ray) shift; run_ray "$@" ;;
  stop-cluster) stop_cluster ;;
  python) shift; exec "$(node_python)" "$@" ;;
  *) die "usage: scripts/cluster-node.sh setup [--results ROOT] | check-gpu | ray ARGS... | stop-cluster | python ARGS..." ;;
esac
