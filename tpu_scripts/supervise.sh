#!/usr/bin/env bash
# Keeps a training job going until train.py finishes: launches it on every worker (launch.sh);
# after a preemption or a failed attempt, relaunches the same command, first recreating the
# slice (delete, create, setup) when it is preempted or gone. Each relaunch resumes bit for bit
# from the newest checkpoint in --workdir, which must be a gs:// bucket. It acts on train.py's
# exit status (training/exit_codes.py): 0 done; 2 bad input, which a relaunch would repeat:
# stop; 75 preempted with its step saved: relaunch, not counted as a failure; 3 hung, 1 or any
# other (255: ssh lost the slice): relaunch, at most --max_restarts times in a row.
# Takes the same flags as launch.sh, with --max_restarts, --backoff_seconds and
# --delete_when_done; attempt k's logs go to LOG_DIR/attempt-k/. A slice that already exists
# is taken as set up (setup.sh); a missing one is created and set up.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
HERE=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=common.sh
source "$HERE/common.sh"
# shellcheck source=create.sh
source "$HERE/create.sh"
# shellcheck source=setup.sh
source "$HERE/setup.sh"
# shellcheck source=launch.sh
source "$HERE/launch.sh"
# shellcheck source=delete.sh
source "$HERE/delete.sh"

# An attempt that ran this long was not a crash loop: the backoff and the restart count reset.
LONG_ATTEMPT_SECONDS=3600

# train.py's exit statuses, as training/exit_codes.py defines them.
readonly DONE=0 BAD_INPUT=2 HUNG=3 PREEMPTED=75

# What an attempt's status means, for the log.
describe_status() {
  case $1 in
    "$HUNG") echo ' (hung: no step finished in time)' ;;
    "$PREEMPTED") echo ' (preempted; its step is saved)' ;;
    255) echo ' (ssh: the slice may be gone)' ;;
  esac
}

# Stops a train.py left running by a failed attempt on a slice that survived it: SIGTERM (it
# saves and exits), then SIGKILL if it has not exited within two minutes.
stop_training() {
  local node
  # shellcheck disable=SC2016  # expanded by the remote shell.
  local command='p=$(cat '"$REMOTE_PID"' 2>/dev/null) || exit 0
grep -q train.py /proc/$p/cmdline 2>/dev/null || exit 0
kill -TERM $p; for i in $(seq 120); do kill -0 $p 2>/dev/null || exit 0; sleep 1; done
kill -KILL $p'
  for node in $(node_names); do
    run gcloud compute tpus tpu-vm ssh "$node" "${LOCATION[@]}" --worker=all --quiet \
      --command="$command" || return
  done
}

# A healthy slice with the code installed and no train.py of an earlier attempt running.
prepare_slice() {
  local attempt=$1 state
  state=$(slice_state)
  if [[ $state == "$(healthy_state)" ]]; then
    if ((attempt > 1)); then stop_training; fi
    return
  fi
  if is_pending "$state"; then
    if wait_until_healthy; then setup_slice; return; fi
    state=$(slice_state)
  fi
  note "$NAME is ${state:-gone}: recreating it"
  if [[ -n $state ]]; then delete_slice || return; fi
  create_slice || return
  setup_slice
}

# --dry_run_preempt_once: the transcript then shows a relaunch on a recreated slice.
pretend_preempted() {
  note "dry run: pretending the slice was preempted during attempt 1 (ssh exits 255)"
  if ((QUEUED)); then DRY_RUN_STATE=SUSPENDED; else DRY_RUN_STATE=PREEMPTED; fi
}

supervise() {
  local attempt=0 failures=0 status started log_dir delay=$BACKOFF_SECONDS saved
  while :; do
    attempt=$((attempt + 1)) started=$SECONDS status=0 saved=0
    log_dir=$LOG_DIR/attempt-$attempt
    note "attempt $attempt"
    if prepare_slice "$attempt"; then
      launch_job "$log_dir" || status=$?
      if ((DRY_RUN_PREEMPT_ONCE && attempt == 1)); then pretend_preempted; status=255; fi
      if ((status == DONE)); then break; fi
      if ((status == BAD_INPUT)); then
        note "train.py exited with status 2 (bad flags, config, data or workdir); a relaunch would too"
        return 2
      fi
      note "attempt $attempt ended with status $status$(describe_status "$status")"
      if ((status == PREEMPTED)); then saved=1; fi
    else
      status=$?
      note "attempt $attempt: no working slice (status $status)"
    fi
    # A preempted attempt saved its step: no failure, and the next waits the shortest time.
    if ((saved || SECONDS - started >= LONG_ATTEMPT_SECONDS)); then
      failures=0 delay=$BACKOFF_SECONDS
    fi
    if ((!saved)); then failures=$((failures + 1)); fi
    if ((failures > MAX_RESTARTS)); then
      note "giving up: $failures attempts in a row failed (--max_restarts=$MAX_RESTARTS)"
      return 1
    fi
    note "relaunching in ${delay}s"
    if ((!DRY_RUN)); then sleep "$delay"; fi
    delay=$((delay * 2 > 3600 ? 3600 : delay * 2))
  done
  note "training finished in attempt $attempt"
  if ((DELETE_WHEN_DONE)); then delete_slice; fi
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  parse_flags "$@"
  require_train_flags
  warn_unless_bucket_workdir
  supervise
fi
