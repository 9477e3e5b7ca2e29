#!/usr/bin/env bash
# Runs once per rank under srun (from slurm/pretrain.sbatch), on that rank's node: chooses the
# network interface the collectives bind to, then execs the command.
#
# gloo binds the address its host name resolves to unless told otherwise, which on many machines
# (and in the local CI cluster) is 127.0.x.x, and the ranks of different nodes never meet. So by
# default (LXTRAIN_SOCKET_IFNAME=auto) GLOO_SOCKET_IFNAME names the interface that holds this node's
# Slurm address (NodeAddr, passed by the sbatch script in LXTRAIN_NODE_ADDRS). An interface name in
# LXTRAIN_SOCKET_IFNAME is used for gloo and NCCL on every node; "none" leaves both alone.
# A GLOO_SOCKET_IFNAME already in the environment always wins.
set -euo pipefail

ifname=${LXTRAIN_SOCKET_IFNAME:-auto}
if [[ $ifname == auto ]]; then
    node=${SLURMD_NODENAME:-$(hostname -s)}
    addr=
    IFS=, read -ra pairs <<<"${LXTRAIN_NODE_ADDRS:-}"
    for pair in "${pairs[@]}"; do
        [[ ${pair%%=*} == "$node" ]] && addr=${pair#*=}
    done
    if [[ -n $addr && ! $addr =~ ^[0-9.]+$ ]]; then
        addr=$(getent ahostsv4 "$addr" | awk '{print $1; exit}')
    fi
    found=
    if [[ -n $addr ]] && command -v ip >/dev/null; then
        found=$(ip -o -4 addr show | awk -v a="$addr" '{split($4, p, "/"); if (p[1] == a) {print $2; exit}}')
    fi
    if [[ -n $found ]]; then
        export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$found}
    elif [[ ${SLURM_PROCID:-0} == 0 ]]; then
        echo "lxtrain: no interface holds $node's address '${addr}': gloo picks its own" >&2
    fi
elif [[ $ifname != none ]]; then
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$ifname}
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$ifname}
fi
exec "$@"
