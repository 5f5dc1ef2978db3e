#!/usr/bin/env bash
# Puts the code on every worker of every slice and installs it with the `tpu` extra.
# By default it ships this checkout's tracked files as they are now, committed or not
# (`git archive`; untracked files stay behind); with --repo=URL each worker clones URL at --ref
# (default: this checkout's HEAD commit).
# Takes the same flags as create.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# A tarball of the working tree: `git stash create` makes a commit of uncommitted changes to
# tracked files without touching the checkout (it prints nothing when there are none).
pack_checkout() {
  local tarball=$1 tree=HEAD
  if ((!DRY_RUN)); then tree=$(git -C "$REPO_ROOT" stash create); fi
  run git -C "$REPO_ROOT" archive --format=tar.gz --output="$tarball" "${tree:-HEAD}"
}

# The remote commands that fetch the code into ~/podium.
fetch_command() {
  local ref=$REF
  if [[ -z $REPO ]]; then
    echo "rm -rf $REMOTE_CODE && mkdir $REMOTE_CODE && tar -xzf $REMOTE_CODE.tar.gz -C $REMOTE_CODE"
    return
  fi
  if [[ -z $ref ]]; then ref=$(git -C "$REPO_ROOT" rev-parse HEAD); fi
  echo "rm -rf $REMOTE_CODE && git clone --quiet $(shell_quote "$REPO") $REMOTE_CODE" \
    "&& git -C $REMOTE_CODE checkout --quiet $(shell_quote "$ref")"
}

install_command() {
  echo "python3 -m pip install --user --quiet uv && rm -rf $REMOTE_VENV" \
    "&& python3 -m uv venv --quiet --python $PYTHON_VERSION $REMOTE_VENV" \
    "&& cd $REMOTE_CODE && python3 -m uv pip install --quiet --python ../$REMOTE_VENV/bin/python" \
    "-e '.[tpu]'"
}

setup_slice() {
  local node tarball=${TMPDIR:-/tmp}/podium-$NAME.tar.gz
  local command
  command="$(fetch_command) && $(install_command)"
  if [[ -z $REPO ]]; then pack_checkout "$tarball"; fi
  for node in $(node_names); do
    if [[ -z $REPO ]]; then
      run gcloud compute tpus tpu-vm scp "$tarball" "$node:$REMOTE_CODE.tar.gz" \
        "${LOCATION[@]}" --worker=all --quiet
    fi
    run gcloud compute tpus tpu-vm ssh "$node" "${LOCATION[@]}" --worker=all --quiet \
      --command="$command"
  done
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  parse_flags "$@"
  setup_slice
fi
