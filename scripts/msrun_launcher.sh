#!/usr/bin/env bash
# Start `msllm train CONFIG` through msrun (MindSpore's dynamic cluster: no rank table) on Ascend or CPU.
#
#   bash scripts/msrun_launcher.sh CONFIG [--worker-num N] [--local-worker-num M] [--node-rank K]
#        [--master-addr IP] [--master-port P] [--log-dir DIR] [--dry-run] [-- EXTRA msllm train ARGS]
#
#   --worker-num N        processes in the whole job (default 2)
#   --local-worker-num M  processes on this node (default N: a single node)
#   --node-rank K         this node's index when the job spans nodes (default 0)
#   --master-addr IP      the node running the scheduler (default 127.0.0.1)
#   --master-port P       its port (default 8118)
#   --log-dir DIR         msrun writes DIR/worker_N.log and DIR/scheduler.log (default runs/msrun_logs)
#   --dry-run             print the msrun command, start nothing
#
# Examples:
#   bash scripts/msrun_launcher.sh configs/tiny_qwen_sft.yaml --worker-num 2 -- --set output_dir=runs/tiny_2p
#       (CPU: two processes in DATA_PARALLEL, gradients averaged across them)
#   bash scripts/msrun_launcher.sh configs/qwen2_5_32b_sft_8k_16p.yaml --worker-num 16 --local-worker-num 8 \
#       --node-rank 0 --master-addr 10.0.0.1                     # and --node-rank 1 on the second server
#
# msrun starts the processes with `python`: run this from the environment where mindspore_llm is installed
# (PYTHON overrides the interpreter msrun is given). The exit code is msrun's: non-zero if any worker failed.
set -uo pipefail

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "msrun_launcher.sh: $*" >&2; exit 2; }

CONFIG="" WORKERS=2 LOCAL="" NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=8118 LOG_DIR=runs/msrun_logs
DRY_RUN=0 EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --worker-num) WORKERS="${2:?}"; shift ;;
    --local-worker-num) LOCAL="${2:?}"; shift ;;
    --node-rank) NODE_RANK="${2:?}"; shift ;;
    --master-addr) MASTER_ADDR="${2:?}"; shift ;;
    --master-port) MASTER_PORT="${2:?}"; shift ;;
    --log-dir) LOG_DIR="${2:?}"; shift ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$CONFIG" ]] || die "unexpected argument $1 (see --help)"; CONFIG="$1" ;;
  esac
  shift
done
[[ -n "$CONFIG" ]] || { usage >&2; exit 2; }
[[ -f "$CONFIG" ]] || die "config $CONFIG not found"
LOCAL="${LOCAL:-$WORKERS}"
for value in "$WORKERS" "$LOCAL" "$NODE_RANK" "$MASTER_PORT"; do
  [[ "$value" =~ ^[0-9]+$ ]] || die "expected a number, got '$value'"
done
(( LOCAL >= 1 && LOCAL <= WORKERS )) || die "--local-worker-num $LOCAL must be between 1 and --worker-num $WORKERS"
command -v msrun > /dev/null || die "msrun not found: it comes with mindspore (pip install mindspore)"

CMD=(msrun --worker_num="$WORKERS" --local_worker_num="$LOCAL" --master_addr="$MASTER_ADDR"
     --master_port="$MASTER_PORT" --node_rank="$NODE_RANK" --log_dir="$LOG_DIR" --join=True
     "${PYTHON:-python}" -m mindspore_llm.cli train "$CONFIG" "${EXTRA[@]}")
if [[ $DRY_RUN -eq 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
echo "msrun: $WORKERS worker(s), $LOCAL on this node (node_rank $NODE_RANK), logs in $LOG_DIR/worker_N.log" >&2
# MindSpore's cluster layer logs every connection at INFO; keep warnings and errors unless the user asks for more
export GLOG_v="${GLOG_v:-2}"
exec "${CMD[@]}"
