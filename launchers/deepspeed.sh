#!/usr/bin/env bash
# The deepspeed launcher, one node or several through a hostfile (passwordless ssh to every host).
#   one node, 2 processes:   NUM_GPUS=2 launchers/deepspeed.sh examples/zero_train.py --optimizer muon
#   several nodes:           HOSTFILE=launchers/hostfile.example launchers/deepspeed.sh examples/zero_train.py
#   DeepSpeed engine script: DS_CONFIG=launchers/configs/zero2.json launchers/deepspeed.sh my_ds_train.py ...
#   CPU (gloo, no GPU):      DS_ACCELERATOR=cpu NUM_GPUS=2 launchers/deepspeed.sh examples/zero_train.py
# Env: HOSTFILE (default: none = this node only), NUM_NODES (default: all hosts of the hostfile),
# NUM_GPUS (processes per node; default: every GPU / the hostfile's slots), MASTER_ADDR / MASTER_PORT
# (default: the first host, 29500), INCLUDE / EXCLUDE (deepspeed's host:slot filters), DS_CONFIG (appended as
# --deepspeed_config for scripts that call deepspeed.initialize; leave unset for torchrun-style scripts such as
# examples/*.py, which read RANK / WORLD_SIZE / LOCAL_RANK set by the launcher).
set -euo pipefail
SCRIPT=${1:?usage: launchers/deepspeed.sh SCRIPT [script args...]}; shift
args=()
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || { echo "deepspeed.sh: hostfile $HOSTFILE not found" >&2; exit 2; }
  args+=(--hostfile "$HOSTFILE")
  if [ -n "${NUM_NODES:-}" ]; then args+=(--num_nodes "$NUM_NODES"); fi
  args+=(--master_addr "${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}")
  args+=(--master_port "${MASTER_PORT:-29500}")
else
  args+=(--master_port "${MASTER_PORT:-29500}")
fi
if [ -n "${NUM_GPUS:-}" ]; then args+=(--num_gpus "$NUM_GPUS"); fi
if [ -n "${INCLUDE:-}" ]; then args+=(--include "$INCLUDE"); fi
if [ -n "${EXCLUDE:-}" ]; then args+=(--exclude "$EXCLUDE"); fi
extra=()
if [ -n "${DS_CONFIG:-}" ]; then
  extra+=(--deepspeed_config "$DS_CONFIG")
else
  args+=(--no_local_rank)  # torchrun-style scripts read LOCAL_RANK from the environment
fi
exec deepspeed "${args[@]}" "$SCRIPT" "$@" ${extra[@]+"${extra[@]}"}
