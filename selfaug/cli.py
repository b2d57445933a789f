"""The command line (docs/design.md, "Command line"): selfaug {launch|precompute|train|eval|study|bench|estimate|
config|inspect|merge|recipes}.

A user's mistake (a config, data, store, model or DeepSpeed-config error, a full disk) ends the
command with one line `selfaug: error: ...` and exit status 2; SELFAUG_DEBUG=1 shows the traceback.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _inspect(path: str, repair: bool = False) -> int:
    import json
    from . import store
    if repair:  # the manifest rebuilt from the shards that verify
        manifest, problems = store.rebuild_manifest(path)
        print(f"{path}: {store.MANIFEST} rebuilt from the shards that verify ({manifest['status']})")
        for p in problems:
            print(f"  FAIL {p}")
        if manifest["status"] != "complete":
            return 1
    if os.path.exists(os.path.join(path, store.MANIFEST)) or os.path.isdir(os.path.join(path, "shards")):
        manifest, problems = store.verify_store(path, values=True)
        if manifest.get("status") == "complete":
            print(store.format_summary(path, manifest))
        for p in problems:
            print(f"  FAIL {p}")
        if not problems:
            print(f"  all {len(manifest['shards'])} shards verified (size, sha256, schema and values)")
        return 1 if problems else 0
    metrics = os.path.join(path, "metrics.jsonl")
    if os.path.exists(metrics):
        rows = [json.loads(line) for line in open(metrics)]
        print(f"run {path}: {len(rows)} optimizer steps logged")
        if rows:
            last = rows[-1]
            print("  last: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()))
        final = os.path.join(path, "final")
        print(f"  final model: {final if os.path.isdir(final) else 'not saved yet'}")
        return 0
    print(f"selfaug: error: {path} is neither a teacher store (manifest.json) nor a run directory (metrics.jsonl)",
          file=sys.stderr)
    return 2


def user_errors() -> tuple:
    """The exception types that mean the user has something to fix (not a bug of selfaug)."""
    from .train.checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .dist import DistError
    from .locks import DirectoryBusy
    from .models import ModelError
    from .store import StoreError
    from .train.loop import TrainError
    return CheckpointError, ConfigError, DataError, DirectoryBusy, DistError, ModelError, StoreError, TrainError


def _recipes(args) -> int:
    from . import shipped
    if args.action == "copy":
        if not args.name:
            print("selfaug: error: selfaug recipes copy NAME [DEST]: name a recipe (selfaug recipes lists them)",
                  file=sys.stderr)
            return 2
        try:
            print(f"copied to {shipped.copy(args.name, args.dest)}")
        except (FileNotFoundError, FileExistsError) as e:
            print(f"selfaug: error: {e}", file=sys.stderr)
            return 2
        return 0
    for name, about in shipped.recipes():
        print(f"{name:<44} {about}")
    print(f"\nDeepSpeed configs: {', '.join(sorted(os.listdir(shipped.root('ds_configs'))))} (ds_configs/NAME)\n"
          "Use one as it is (selfaug launch all recipes/NAME.yaml works from any directory) or copy it to edit: "
          "selfaug recipes copy NAME [DEST]")
    return 0


def _visible_gpus() -> int:
    import torch
    return max(torch.cuda.device_count(), 1)


def _check_transformers() -> None:
    """A transformers outside the tested range is one line before any model loads (selfaug needs transformers 5's
    API; with another release a run would stop mid-way on a missing name)."""
    from .config import ConfigError
    from .models import TRANSFORMERS, transformers_outside_range
    found = transformers_outside_range()
    if found:
        raise ConfigError(f"selfaug runs with transformers {','.join(TRANSFORMERS)}; found {found}: pip install "
                          f"'transformers{','.join(TRANSFORMERS)}'")


def _merge(args) -> int:
    """selfaug merge RUN: a run's adapter merged in fp32 into its base, streamed file by file (`train.merge`)."""
    from .config import ConfigError, load_config
    from .models import load_tokenizer_for, resolve_dtype
    from .train.merge import describe, merge
    import torch
    final = args.run if os.path.isfile(os.path.join(args.run, "adapter_config.json")) else os.path.join(args.run, "final")
    saved = os.path.join(final, "selfaug_config.yaml")
    if not os.path.isfile(os.path.join(final, "adapter_config.json")) or not os.path.isfile(saved):
        raise ConfigError(f"selfaug merge {args.run}: no LoRA run there (a run directory whose final/ holds "
                          "adapter_config.json and selfaug_config.yaml, or that final/ itself)")
    cfg = load_config(saved, saved=True)
    dtype = resolve_dtype(cfg.model.dtype if args.dtype == "auto" else args.dtype,
                          "cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or os.path.join(final, "merged")
    print(describe(merge(final, cfg.model, out, dtype, tokenizer=load_tokenizer_for(cfg.model)), out))
    return 0


def _run(args) -> int:
    if args.command == "inspect":
        return _inspect(args.path, args.repair)
    if args.command == "merge":
        return _merge(args)
    if args.command == "recipes":
        return _recipes(args)
    if args.command == "config" and args.reference:
        from .config import reference
        print(reference(), end="")
        return 0
    from .config import describe, load_config
    if args.config is None:
        print("selfaug: error: selfaug config needs --config RECIPE (or --reference)", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    if args.command in ("config", "estimate"):  # the files it names (the stages check them as they start)
        from .config import check_paths
        check_paths(cfg, data=getattr(args, "seq_len", None) is None)  # estimate --seq-len reads no data
    if args.command in ("precompute", "train", "eval", "study", "bench"):
        _check_transformers()
    if args.command == "config" and args.get:  # one value, for scripts (launch.sh reads train.output_dir)
        from .config import ConfigError
        section, _, key = args.get.partition(".")
        if not hasattr(getattr(cfg, section, None), key):
            raise ConfigError(f"config --get {args.get}: no such key; name it as SECTION.KEY (see selfaug config "
                              f"--reference)")
        print(getattr(getattr(cfg, section), key))
    elif args.command == "config":
        print(describe(cfg))
    elif args.command == "precompute":
        from .precompute import run
        run(cfg)
    elif args.command == "train":
        from .train import train
        stop_after = os.environ.get("SELFAUG_STOP_AFTER")  # a hook of the test suite's resume tests, not a recipe key
        train(cfg, stop_after=int(stop_after) if stop_after else None)
    elif args.command == "eval":
        from .eval.evaluate import run
        run(cfg)
    elif args.command == "estimate":
        from .estimate import run
        run(cfg, args.gpus or int(os.environ.get("NUM_GPUS", 0)) or _visible_gpus(), args.seq_len, args.examples,
            args.gpus_per_node)
    elif args.command == "study":
        from .eval.study import run
        run(cfg, args.config, args.overrides)
    elif args.command == "bench":
        from .bench.command import run
        run(cfg, [s for s in args.only.split(",") if s], args.out, args.config, args.overrides, args.smoke)
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import __version__
    parser = argparse.ArgumentParser(prog="selfaug", description="SelfAug fine-tuning with a stored teacher on "
                                     "DeepSpeed ZeRO: precompute, train, eval")
    parser.add_argument("--version", action="version", version=f"selfaug {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("launch", help="a stage on every GPU (NUM_GPUS, HOSTFILE) or NUM_PROCS CPU processes, "
                                      "stopped by a signal with a checkpoint (exit 75)")
    p.add_argument("stage", choices=["precompute", "train", "eval", "all"], help="all: precompute, train, eval")
    p.add_argument("recipe", help="recipe YAML (a path from this directory, or a shipped one: recipes/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    for name, text in (("precompute", "stage 1: the teacher store"), ("train", "stage 2: DeepSpeed training"),
                       ("eval", "stage 3: base vs fine-tuned"),
                       ("study", "every arm under several seeds, evaluated, with confidence intervals"),
                       ("bench", "performance benchmarks"),
                       ("estimate", "before anything runs: the store's size, steps, tokens and memory per GPU"),
                       ("config", "print the resolved recipe with each key's help")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=name != "config", help="recipe YAML (a path, or a shipped one: "
                                                                   "recipes/tiny.yaml)")
        if name == "config":
            p.add_argument("--reference", action="store_true", help="every key of every section as Markdown (what "
                                                                    "docs/configuration.md holds)")
            p.add_argument("--get", metavar="SECTION.KEY", help="print this key's resolved value alone")
        p.add_argument("overrides", nargs="*", help="section.key=value")
        if name == "estimate":
            p.add_argument("--gpus", type=int, default=0, help="GPUs (data-parallel ranks) to plan for (default: "
                                                               "$NUM_GPUS, else the visible GPUs, else 1)")
            p.add_argument("--gpus-per-node", type=int, help="GPUs on one node (default: --gpus, at most 8): the "
                                                             "host memory per node and stage 3's device_map")
            p.add_argument("--seq-len", type=int, help="without data: every example this many tokens (with "
                                                       "--examples; the data is not read)")
            p.add_argument("--examples", type=int, help="without data: this many examples (with --seq-len)")
        if name == "bench":
            p.add_argument("--only", default="", help="comma-separated: step,precompute,storage,fidelity,long,"
                                                      "data,scale,packing,budget,positions,open,reader,hf,checkpoint,"
                                                      "prefetch,loss (those by default), drift,gpu")
            p.add_argument("--out", default="runs/bench.json")
            p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p = sub.add_parser("inspect", help="summarize and verify a teacher store or a run directory")
    p.add_argument("path")
    p.add_argument("--repair", action="store_true", help="a store: rebuild its manifest from the shards that verify "
                                                         "(nothing is deleted or computed)")
    p = sub.add_parser("merge", help="a LoRA run's adapter merged into its base in fp32, the base streamed file by "
                                     "file: RUN/final/merged")
    p.add_argument("run", help="the run directory (train.output_dir) or its final/")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="the merged weights' dtype (auto: the run's model.dtype; the report says what bf16 loses)")
    p.add_argument("--out", help="where to (default: RUN/final/merged)")
    p = sub.add_parser("recipes", help="list the shipped recipes, or copy one to edit")
    p.add_argument("action", nargs="?", choices=["list", "copy"], default="list")
    p.add_argument("name", nargs="?", help="copy: the recipe (e.g. tiny.yaml, scale/llama3-8b/recipe.yaml)")
    p.add_argument("dest", nargs="?", help="copy: where to (default: the same path under this directory)")
    # the deepspeed launcher appends --local_rank=N
    args, unknown = parser.parse_known_args(argv)
    unknown = [u for u in unknown if not u.startswith("--local_rank")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "launch":  # its ranks record their own status; it returns theirs
        return _launch(args)
    from .train.preemption import record_exit
    try:
        code = _handled(args)
        sys.stdout.flush()  # here, not at exit: a reader gone (`selfaug config | head`) is seen below
    except BrokenPipeError:  # the reader closed the pipe: nothing more to say, and no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit fails no more
        code = 141  # 128 + SIGPIPE, what a shell reports for a command a closed pipe ended
    record_exit(code)
    return code


def _launch(args) -> int:
    """selfaug launch: the stage's status; a user's mistake is one line (without importing torch here: the
    launcher's environment decides the ranks' threads and accelerator)."""
    from .errors import SelfAugError
    from .launcher import launch
    try:
        return launch(args.stage, args.recipe, args.overrides)
    except SelfAugError as e:
        if os.environ.get("SELFAUG_DEBUG") == "1":
            raise
        print(f"selfaug: error: {e}", file=sys.stderr)
        return 2


def _handled(args) -> int:
    """The command's exit status: 0, EXIT_PREEMPTED (75) or 2 with one line for a user's error."""
    from .train.preemption import EXIT_PREEMPTED, Preempted
    try:
        return _run(args)
    except Preempted as e:
        print(f"selfaug: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except user_errors() as e:
        if os.environ.get("SELFAUG_DEBUG") == "1":
            raise
        print(f"selfaug: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno == errno.ENOSPC and os.environ.get("SELFAUG_DEBUG") != "1":
            where = os.path.dirname(e.filename) if e.filename else "an output directory"
            print(f"selfaug: error: no space left on the device holding {where}; "
                  "free space (or choose another output directory) and run the command again: finished shards "
                  "and checkpoints are kept", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
