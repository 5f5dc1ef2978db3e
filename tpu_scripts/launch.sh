#!/usr/bin/env bash
# Runs train.py with the flags after `--` on every worker of every slice at once (one
# `tpu-vm ssh --worker=<i>` each), streams each worker's output to the terminal prefixed with
# its node and worker, and saves it to LOG_DIR/<node>-worker<i>.log. Exits 0 if every worker
# did, else with the first non-zero status (node by node, worker by worker).
# Takes the same flags as create.sh, e.g.
#   tpu_scripts/launch.sh --name=my-tpu --zone=us-east5-a --accelerator=v5p-128 -- \
#       --workdir=gs://my-bucket/runs/8b --config=configs/default.py:llama3_8b
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# What each worker runs: it records its process id, so that a relaunch can stop a train.py left
# over from a failed attempt, then becomes train.py.
train_command() {
  # shellcheck disable=SC2016  # $$ is the remote shell's, expanded there.
  echo 'echo $$ >' "$REMOTE_PID && cd $REMOTE_CODE &&" \
    "exec ../$REMOTE_VENV/bin/python train.py $(shell_quote "${TRAIN_FLAGS[@]}")"
}

prefix_lines() {
  local line
  while IFS= read -r line || [[ -n $line ]]; do printf '%s%s\n' "$1" "$line"; done
}

run_worker() {
  local node=$1 worker=$2 log=$3
  local cmd=(gcloud compute tpus tpu-vm ssh "$node" "${LOCATION[@]}" --worker="$worker" --quiet
    --command="$(train_command)")
  trace "${cmd[@]}"
  if ((DRY_RUN)); then return 0; fi
  "${cmd[@]}" 2>&1 | tee "$log" | prefix_lines "[$node/$worker] "
}

launch_job() {
  local log_dir=${1:-$LOG_DIR} node worker status=0 code pids=() names=()
  if ((SLICES > 1)) && [[ " ${TRAIN_FLAGS[*]} " != *multislice* ]]; then
    note "note: $SLICES slices; the config needs DCN mesh axes, e.g. the multislice preset"
  fi
  note "train.py on $SLICES x $HOSTS workers; their logs: $log_dir/<node>-worker<i>.log"
  if ((!DRY_RUN)); then mkdir -p "$log_dir"; fi
  for node in $(node_names); do
    for ((worker = 0; worker < HOSTS; worker++)); do
      if ((DRY_RUN)); then run_worker "$node" "$worker" '' && continue; fi
      run_worker "$node" "$worker" "$log_dir/$node-worker$worker.log" &
      pids+=($!) names+=("$node/$worker")
    done
  done
  for ((worker = 0; worker < ${#pids[@]}; worker++)); do
    code=0
    wait "${pids[worker]}" || code=$?
    if ((code != 0)); then
      note "${names[worker]} exited with status $code"
      if ((status == 0)); then status=$code; fi
    fi
  done
  return "$status"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  parse_flags "$@"
  require_train_flags
  warn_unless_bucket_workdir
  launch_job
fi
