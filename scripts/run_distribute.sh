#!/usr/bin/env bash
# Start a training job on this server's Ascend devices from an HCCL rank table (run it on every server).
#
#   bash scripts/run_distribute.sh RANK_TABLE [CONFIG] [--dry-run] [--server-index K] [-- EXTRA msllm train ARGS]
#
#   RANK_TABLE   a rank table file; a bare name (rank_table_16p.json) is looked up in rank_tables/
#   CONFIG       training YAML (default: configs/qwen2_5_32b_sft_8k_16p.yaml)
#   --dry-run    print every local rank's environment and command, start nothing
#   --server-index K / SERVER_ID=K   this server's position in the table's server_list
#                (default: the server whose server_id is one of this host's addresses, `hostname -I`)
#
# Examples (from the repository root):
#   bash scripts/run_distribute.sh rank_table_16p.json                       # on both servers
#   SERVER_ID=1 bash scripts/run_distribute.sh rank_table_16p.json --dry-run
#   bash scripts/run_distribute.sh rank_table_8p.json configs/my_8p.yaml -- --set train.steps=10
#
# Before anything starts: the table is validated (as msllm rank-table validate, against the config's device count)
# and the local device count is checked against the NPUs visible here (/dev/davinciN). Each rank runs
# `msllm train CONFIG` with RANK_TABLE_FILE, DEVICE_ID, RANK_ID, RANK_SIZE set, pinned to its share of the CPU
# cores, logging to LOG_DIR/rank_N/train.log (LOG_DIR default: runs/distribute_logs). If a rank fails, the others
# are stopped, the failing rank's log tail is printed and the exit code is non-zero.
# Environment: HCCL_CONNECT_TIMEOUT (default 1200 s) and HCCL_EXEC_TIMEOUT (default 1800 s) are passed on;
# PYTHON picks the interpreter (default: python); MSLLM_TRAIN_CMD replaces "$PYTHON -m mindspore_llm.cli train";
# CPU_CORES: cores to share among the local ranks (default: nproc); DEVICE_DIR: where the davinciN device
# nodes are (default: /dev).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "run_distribute.sh: $*" >&2; exit 2; }

TABLE="" CONFIG="" DRY_RUN=0 SERVER_INDEX="${SERVER_ID:-}" EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --server-index) [[ $# -ge 2 ]] || die "--server-index needs a value"; SERVER_INDEX="$2"; shift ;;
    --server-index=*) SERVER_INDEX="${1#*=}" ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) if [[ -z "$TABLE" ]]; then TABLE="$1"; elif [[ -z "$CONFIG" ]]; then CONFIG="$1";
       else die "unexpected argument $1 (see --help)"; fi ;;
  esac
  shift
done
[[ -n "$TABLE" ]] || { usage >&2; exit 2; }
if [[ ! -f "$TABLE" && "$TABLE" != */* && -f "$ROOT/rank_tables/$TABLE" ]]; then TABLE="$ROOT/rank_tables/$TABLE"; fi
[[ -f "$TABLE" ]] || die "rank table $TABLE not found (a bare name is looked up in $ROOT/rank_tables/)"
CONFIG="${CONFIG:-$ROOT/configs/qwen2_5_32b_sft_8k_16p.yaml}"
[[ -f "$CONFIG" ]] || die "config $CONFIG not found"
TABLE="$(cd "$(dirname "$TABLE")" && pwd)/$(basename "$TABLE")"
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
[[ -z "$SERVER_INDEX" || "$SERVER_INDEX" =~ ^[0-9]+$ ]] || die "server index must be a number, got '$SERVER_INDEX'"

PYTHON="${PYTHON:-python}"
DEVICE_DIR="${DEVICE_DIR:-/dev}"
MSLLM=("$PYTHON" -m mindspore_llm.cli)
read -r -a TRAIN_CMD <<< "${MSLLM_TRAIN_CMD:-$PYTHON -m mindspore_llm.cli train}"

# 1-2. The table, validated against itself and the config's device count (msllm rank-table validate), and this
# server's ranks in it (one Python start for both).
if [[ -n "$SERVER_INDEX" ]]; then WHERE=(--server-index "$SERVER_INDEX")
else WHERE=(--local-ips "$(hostname -I 2>/dev/null || hostname -i 2>/dev/null || true)"); fi
LOCAL="$("${MSLLM[@]}" rank-table local "$TABLE" --config "$CONFIG" "${WHERE[@]}")" \
  || die "rank table rejected or this server not found in it; nothing started"
read -r SERVER RANK_SIZE <<< "$(head -n 1 <<< "$LOCAL")"
mapfile -t RANKS < <(tail -n +2 <<< "$LOCAL")
LOCAL_NUM=${#RANKS[@]}

# 3. The devices this host can see.
if [[ $DRY_RUN -eq 1 ]]; then
  echo "# dry run: device check skipped (the table gives server $SERVER $LOCAL_NUM devices)"
else
  shopt -s nullglob
  VISIBLE=("$DEVICE_DIR"/davinci[0-9]*)
  shopt -u nullglob
  [[ ${#VISIBLE[@]} -eq $LOCAL_NUM ]] || die "the table gives server $SERVER $LOCAL_NUM devices but ${#VISIBLE[@]} \
NPUs are visible here ($DEVICE_DIR/davinciN); fix the table (msllm rank-table generate) or the visible devices"
  for line in "${RANKS[@]}"; do
    read -r _ device <<< "$line"
    [[ -e "$DEVICE_DIR/davinci$device" ]] || die "device $device of the table is not visible here \
($DEVICE_DIR/davinci$device)"
  done
fi

export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}"
export HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1800}"
LOG_DIR="${LOG_DIR:-runs/distribute_logs}"
CORES="${CPU_CORES:-$(nproc)}"  # cores shared among the local ranks
SHARE=$(( CORES / LOCAL_NUM ))
PIN=()
command -v taskset > /dev/null || echo "# taskset not found: ranks are not pinned to CPU cores" >&2

# 4. One process per local device.
PIDS=() RANK_OF=()
stop_all() { for pid in "${PIDS[@]}"; do kill "$pid" 2> /dev/null; done; }
trap 'stop_all; exit 130' INT TERM
for i in "${!RANKS[@]}"; do
  read -r rank device <<< "${RANKS[$i]}"
  dir="$LOG_DIR/rank_$rank"
  if [[ $SHARE -ge 1 ]] && command -v taskset > /dev/null; then
    PIN=(taskset -c "$(( i * SHARE ))-$(( i * SHARE + SHARE - 1 ))")
  fi
  ENVS=(RANK_TABLE_FILE="$TABLE" DEVICE_ID="$device" RANK_ID="$rank" RANK_SIZE="$RANK_SIZE" SERVER_ID="$SERVER"
        HCCL_CONNECT_TIMEOUT="$HCCL_CONNECT_TIMEOUT" HCCL_EXEC_TIMEOUT="$HCCL_EXEC_TIMEOUT")
  CMD=("${PIN[@]}" "${TRAIN_CMD[@]}" "$CONFIG" "${EXTRA[@]}")
  if [[ $DRY_RUN -eq 1 ]]; then
    echo "rank $rank: $(printf '%q ' env "${ENVS[@]}" "${CMD[@]}")> $dir/train.log 2>&1"
    continue
  fi
  mkdir -p "$dir"
  env "${ENVS[@]}" "${CMD[@]}" > "$dir/train.log" 2>&1 &
  PIDS+=($!) RANK_OF+=("$rank")
  echo "started rank $rank (device $device, pid $!), log $dir/train.log"
done
[[ $DRY_RUN -eq 1 ]] && exit 0

# 5. Wait; the first failure stops the others. A poll of `kill -0` and `wait PID`, which every bash >= 4.4 has (the
# images Ascend servers ship: openEuler 20.03, Kylin V10 and Ubuntu 20.04 have bash 5.0, where `wait -n -p` fails
# with "invalid option" at once). bash reaps its children as they exit and keeps each one's status for `wait PID`.
running=("${!PIDS[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  still=()
  for i in "${running[@]}"; do
    if kill -0 "${PIDS[$i]}" 2> /dev/null; then still+=("$i"); continue; fi
    wait "${PIDS[$i]}"
    status=$?
    [[ $status -eq 0 ]] && continue
    failed="${RANK_OF[$i]}"
    echo "rank $failed exited with status $status; stopping the other ranks" >&2
    stop_all
    wait 2> /dev/null
    echo "---- last 30 lines of $LOG_DIR/rank_$failed/train.log ----" >&2
    tail -n 30 "$LOG_DIR/rank_$failed/train.log" >&2
    exit 1
  done
  running=("${still[@]}")
  [[ ${#running[@]} -gt 0 ]] && sleep 1
done
echo "all $LOCAL_NUM ranks of server $SERVER finished"
