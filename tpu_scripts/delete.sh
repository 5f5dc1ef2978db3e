#!/usr/bin/env bash
# Deletes the slice: the TPU VM, or the queued resource with its nodes (--force).
# Takes the same flags as create.sh.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

delete_slice() {
  # --quiet: gcloud asks for confirmation otherwise.
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
  fi
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  parse_flags "$@"
  delete_slice
fi
