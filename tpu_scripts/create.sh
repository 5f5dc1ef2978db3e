#!/usr/bin/env bash
# Creates the slice: a TPU VM (`tpu-vm create`), or a queued resource when asked for (--queued)
# or when there are several slices (`queued-resources create`, one node per slice), then waits
# until it is ready. --help lists the flags.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

create_slice() {
  local cmd
  if ((QUEUED)); then
    cmd=(gcloud compute tpus queued-resources create "$NAME" "${LOCATION[@]}"
      --accelerator-type="$GCLOUD_TYPE" --runtime-version="$VERSION")
    if ((SLICES > 1)); then
      cmd+=(--node-count="$SLICES" --node-prefix="$NAME")
    else
      cmd+=(--node-id="$NAME")
    fi
  else
    cmd=(gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}"
      --accelerator-type="$GCLOUD_TYPE" --version="$VERSION")
  fi
  if [[ -n $TIER ]]; then cmd+=("$TIER"); fi
  run "${cmd[@]}"
  DRY_RUN_STATE=$(healthy_state)
  # `tpu-vm create` returns once the VM is up; a queued resource is only queued.
  if ((QUEUED)); then wait_until_healthy; fi
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  parse_flags "$@"
  create_slice
fi
