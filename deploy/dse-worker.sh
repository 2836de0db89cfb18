#!/usr/bin/env bash
# One worker of a cluster job (SLURM array task or Kubernetes Indexed Job pod), run from the checkout.
#
#   DSE_STORAGE  the study's database, postgresql://USER:PASS@DBHOST:5432/dse (required)
#   DSE_STUDY    the study file, relative to the checkout (or pass it as the first argument)
#   DSE_WAIT     seconds a joining worker waits for worker 0 to create the study (default 900)
#
# Worker 0 (SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX = 0) creates the study, evaluates the dense
# model, enqueues the baselines and starting points, then runs trials; every other worker joins it.
# All of them stop when the study has n_trials finished trials. The factor cache (the study's
# cache.dir) should be on the shared filesystem, so a weight is factorized once for all workers.
set -euo pipefail
STUDY=${1:-${DSE_STUDY:?set DSE_STUDY or pass the study file}}
INDEX=${SLURM_ARRAY_TASK_ID:-${JOB_COMPLETION_INDEX:-0}}
: "${DSE_STORAGE:?set DSE_STORAGE to the study database URL}"
DSE=${DSE:-dse}
if [ "$INDEX" = 0 ]; then
  exec $DSE run "$STUDY" --storage "$DSE_STORAGE" --quiet
else
  exec $DSE worker "$STUDY" --storage "$DSE_STORAGE" --wait "${DSE_WAIT:-900}" --quiet
fi
