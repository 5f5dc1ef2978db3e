# Shared by the tpu_scripts (sourced, never run): the flags every script takes, the dry-run
# wrapper, and what an accelerator name implies (gcloud's type, runtime, hosts, node names).
# Written for bash 3.2 too (macOS), so no associative arrays or ${x,,}.
# shellcheck shell=bash
# shellcheck disable=SC2034  # Globals set here are read by the scripts that source this file.

[[ -n "${PODIUM_COMMON_LOADED:-}" ]] && return 0
PODIUM_COMMON_LOADED=1

SCRIPT=$(basename "$0")
# The trace of a dry run is its output (stdout); a real run traces to stderr and keeps stdout
# for what the commands print. fd 3 stays stdout even inside $(...).
exec 3>&1

# Remote layout, relative to each worker's home directory.
REMOTE_CODE=podium
REMOTE_VENV=podium-venv
REMOTE_PID=podium-train.pid
# The TPU runtime images are Ubuntu 22.04, whose Python is 3.10; podium needs 3.11 or newer,
# so setup makes a virtual environment with uv, which fetches that Python.
PYTHON_VERSION=3.11

usage() {
  cat <<'EOF'
Flags (the same for every script; keep them in one shell array):
  --name=NAME           TPU VM name; for several slices, the queued resource and node prefix
                        (nodes NAME-0, NAME-1, ...)
  --zone=ZONE           e.g. us-east5-a
  --accelerator=TYPE    v4-N, v5p-N, v5e-N (= v5litepod-N), v6e-N; Mx<type> for M slices
  --slices=M            slices joined over the data-center network (default 1)
  --spot | --reserved   provisioning (default on demand)
  --queued              one slice as a queued resource too (always so for several slices)
  --project=PROJECT     default: gcloud's configured project
  --version=RUNTIME     TPU runtime version (default by generation)
  --repo=URL [--ref=REF]  setup clones URL at REF (default: local HEAD) instead of copying
                        this checkout
  --log_dir=DIR         launch: each worker's log as DIR/<node>-worker<i>.log (default logs)
  --max_restarts=N      supervise: relaunches before giving up (default 20)
  --backoff_seconds=S   supervise: first wait before a relaunch, doubled each time (default 60)
  --poll_seconds=S      wait between state checks of a slice being provisioned (default 30)
  --delete_when_done    supervise: delete the slice(s) once training has finished
  --dry_run             print each command instead of running it
  --dry_run_preempt_once  supervise --dry_run: pretend the first launch is preempted
  -- FLAGS...           launch, supervise: train.py's flags, the same on every worker
EOF
}

# Bad input: one line naming the flag, exit status 2.
usage_error() {
  echo "$SCRIPT: $*" >&2
  exit 2
}

note() {
  echo "$SCRIPT: $*" >&2
}

# Arguments as one line a shell reads back as the same words.
shell_quote() {
  local arg flag words=()
  for arg in "$@"; do
    flag=''
    # --flag='a value' reads better than '--flag=a value'.
    if [[ $arg =~ ^--[A-Za-z0-9_-]+= ]]; then flag=${BASH_REMATCH[0]} arg=${arg#"$flag"}; fi
    if [[ $arg =~ ^[-A-Za-z0-9_@%+=:,./]+$ ]]; then
      words+=("$flag$arg")
    else
      words+=("$flag'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}

trace() {
  if ((DRY_RUN)); then echo "+ $(shell_quote "$@")" >&3; else echo "+ $(shell_quote "$@")" >&2; fi
}

# Prints a command; runs it unless --dry_run.
run() {
  trace "$@"
  if ((DRY_RUN)); then return 0; fi
  "$@"
}

parse_flags() {
  NAME='' ZONE='' PROJECT='' ACCELERATOR='' SLICES='' TIER='' QUEUED=0 VERSION=''
  REPO='' REF='' LOG_DIR=logs MAX_RESTARTS=20 BACKOFF_SECONDS=60 POLL_SECONDS=30
  DELETE_WHEN_DONE=0 DRY_RUN=0 DRY_RUN_PREEMPT_ONCE=0
  TRAIN_FLAGS=()
  while (($#)); do
    case $1 in
      --) shift; TRAIN_FLAGS=("$@"); break ;;
      --name=*) NAME=${1#*=} ;;
      --zone=*) ZONE=${1#*=} ;;
      --project=*) PROJECT=${1#*=} ;;
      --accelerator=*) ACCELERATOR=${1#*=} ;;
      --slices=*) SLICES=${1#*=} ;;
      --version=*) VERSION=${1#*=} ;;
      --repo=*) REPO=${1#*=} ;;
      --ref=*) REF=${1#*=} ;;
      --log_dir=*) LOG_DIR=${1#*=} ;;
      --max_restarts=*) MAX_RESTARTS=${1#*=} ;;
      --backoff_seconds=*) BACKOFF_SECONDS=${1#*=} ;;
      --poll_seconds=*) POLL_SECONDS=${1#*=} ;;
      --spot | --reserved)
        [[ -z $TIER || $TIER == "$1" ]] || usage_error "--spot and --reserved exclude each other"
        TIER=$1 ;;
      --queued) QUEUED=1 ;;
      --delete_when_done) DELETE_WHEN_DONE=1 ;;
      --dry_run) DRY_RUN=1 ;;
      --dry_run_preempt_once) DRY_RUN_PREEMPT_ONCE=1 ;;
      -h | --help) usage; exit 0 ;;
      --name | --zone | --project | --accelerator | --slices | --version | --repo | --ref | \
        --log_dir | --max_restarts | --backoff_seconds | --poll_seconds)
        usage_error "$1 needs a value: $1=VALUE" ;;
      *) usage_error "unknown flag $1 (--help lists them)" ;;
    esac
    shift
  done
  validate_flags
}

validate_flags() {
  [[ -n $NAME ]] || usage_error "--name is required"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    usage_error "--name=$NAME: use lowercase letters, digits and hyphens, starting with a letter"
  [[ -n $ZONE ]] || usage_error "--zone is required"
  [[ -n $ACCELERATOR ]] || usage_error "--accelerator is required, e.g. --accelerator=v5p-128"
  parse_accelerator
  decimal MAX_RESTARTS max_restarts
  decimal BACKOFF_SECONDS backoff_seconds
  decimal POLL_SECONDS poll_seconds
  if ((DRY_RUN_PREEMPT_ONCE && !DRY_RUN)); then
    usage_error "--dry_run_preempt_once needs --dry_run"
  fi
  [[ -z $REF || -n $REPO ]] || usage_error "--ref needs --repo"
  LOCATION=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then LOCATION+=(--project="$PROJECT"); fi
}

# Checks that variable $1 (flag --$2) holds a whole number and rewrites it without leading
# zeros: bash arithmetic reads 010 as octal 8 and fails on 08. Nine digits keep it far from
# overflow.
decimal() {
  local value=${!1}
  [[ $value =~ ^[0-9]{1,9}$ ]] || usage_error "--$2=$value: expected a whole number, e.g. --$2=10"
  printf -v "$1" '%d' "$((10#$value))"
}

# --accelerator (and --slices) -> FAMILY, CHIPS, SLICES, GCLOUD_TYPE, VERSION, HOSTS.
parse_accelerator() {
  local cube='4 8 16 32 64 128 256 512 1024 2048 4096 6144' plane='1 4 8 16 32 64 128 256'
  local sizes count per_chip=1 largest prefix
  [[ $ACCELERATOR =~ ^(([0-9]{1,4})x)?(v4|v5p|v5e|v5litepod|v6e)-([0-9]{1,5})$ ]] ||
    usage_error "--accelerator=$ACCELERATOR: unknown; expected v4-N, v5p-N, v5e-N, v6e-N, or Mx<type>"
  prefix=${BASH_REMATCH[2]} FAMILY=${BASH_REMATCH[3]} count=$((10#${BASH_REMATCH[4]}))
  if [[ -n $prefix ]]; then prefix=$((10#$prefix)); fi
  if [[ -n $SLICES ]]; then decimal SLICES slices; fi
  [[ $FAMILY == v5litepod ]] && FAMILY=v5e
  case $FAMILY in
    v4) sizes=$cube per_chip=2 largest=2048 ;;
    v5p) sizes=$cube per_chip=2 largest=6144 ;;
    *) sizes=$plane largest=256 ;;
  esac
  # v4 and v5p names count TensorCores, two per chip; v5e and v6e names count chips.
  CHIPS=$((count / per_chip))
  if ((count % per_chip || CHIPS > largest)) || [[ " $sizes " != *" $CHIPS "* ]]; then
    usage_error "--accelerator=$ACCELERATOR: no $FAMILY slice of that size"
  fi
  if [[ -n $prefix && -n $SLICES && $prefix != "$SLICES" ]]; then
    usage_error "--slices=$SLICES disagrees with --accelerator=$ACCELERATOR"
  fi
  SLICES=${SLICES:-${prefix:-1}}
  ((SLICES > 0)) || usage_error "--slices=$SLICES: expected a positive number"
  if ((SLICES > 1)); then QUEUED=1; fi
  # gcloud calls v5e slices v5litepod.
  GCLOUD_TYPE=$FAMILY-$count
  [[ $FAMILY == v5e ]] && GCLOUD_TYPE=v5litepod-$count
  case $FAMILY in
    v4) VERSION=${VERSION:-tpu-ubuntu2204-base} ;;
    v5p) VERSION=${VERSION:-v2-alpha-tpuv5} ;;
    v5e) VERSION=${VERSION:-v2-alpha-tpuv5-lite} ;;
    v6e) VERSION=${VERSION:-v2-alpha-tpuv6e} ;;
  esac
  # Host VMs per slice: 4 chips each, except the single-host v5e/v6e slices of up to 8 chips.
  HOSTS=$(((CHIPS + 3) / 4))
  if [[ $sizes == "$plane" ]] && ((CHIPS <= 8)); then HOSTS=1; fi
}

# The TPU VM nodes: NAME, or NAME-0 ... NAME-(M-1) for M slices.
node_names() {
  local i
  if ((SLICES == 1)); then echo "$NAME"; return; fi
  for ((i = 0; i < SLICES; i++)); do echo "$NAME-$i"; done
}

healthy_state() {
  if ((QUEUED)); then echo ACTIVE; else echo READY; fi
}

# The slice's state as gcloud reports it (READY, PREEMPTED, ACTIVE, SUSPENDED, ...); empty if
# it does not exist. A dry run answers DRY_RUN_STATE (healthy unless a test of the supervisor
# says otherwise).
slice_state() {
  local kind=tpu-vm format='value(state)'
  if ((QUEUED)); then kind=queued-resources format='value(state.state)'; fi
  local cmd=(gcloud compute tpus "$kind" describe "$NAME" "${LOCATION[@]}" --format="$format")
  trace "${cmd[@]}"
  if ((DRY_RUN)); then echo "${DRY_RUN_STATE:-$(healthy_state)}"; return 0; fi
  "${cmd[@]}" 2>/dev/null || true
}

# Still being provisioned or repaired: worth waiting for, not recreating.
is_pending() {
  case $1 in
    CREATING | STARTING | RESTARTING | REPAIRING | ACCEPTED | WAITING_FOR_RESOURCES | \
      PROVISIONING) return 0 ;;
    *) return 1 ;;
  esac
}

# Waits while the slice is pending; succeeds once it is healthy, fails if it ends otherwise.
wait_until_healthy() {
  local state
  while :; do
    state=$(slice_state)
    if [[ $state == "$(healthy_state)" ]]; then return 0; fi
    is_pending "$state" || { note "$NAME is ${state:-gone}"; return 1; }
    note "$NAME is $state; checking again in ${POLL_SECONDS}s"
    sleep "$POLL_SECONDS"
  done
}

require_train_flags() {
  if ((${#TRAIN_FLAGS[@]} == 0)); then usage_error "train.py's flags go after --, e.g. -- --workdir=gs://..."; fi
}

# Resuming needs storage every worker of every (re)created slice can reach.
warn_unless_bucket_workdir() {
  local flag previous='' workdir=''
  for flag in "${TRAIN_FLAGS[@]}"; do
    case $flag in --workdir=*) workdir=${flag#--workdir=} ;; esac
    if [[ $previous == --workdir ]]; then workdir=$flag; fi
    previous=$flag
  done
  if [[ $workdir != gs://* ]]; then
    note "warning: --workdir=${workdir:-(none)} is not a gs:// bucket; workers cannot share" \
      "it, and a recreated slice starts without it, so a relaunch cannot resume"
  fi
}
