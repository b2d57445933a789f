"""selfaug {precompute|train|eval|inspect|bench}: the command line (DESIGN.md, "Command-line surface")."""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _inspect(path: str) -> int:
    import json
    from . import teacher_store as ts
    if os.path.exists(os.path.join(path, ts.MANIFEST)):
        from .precompute import format_summary
        manifest, problems = ts.verify_store(path)
        if manifest.get("status") == "complete":
            print(format_summary(path, manifest))
        for p in problems:
            print(f"  FAIL {p}")
        if not problems:
            print(f"  all {len(manifest['shards'])} shards verified (size and sha256)")
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
    print(f"{path} is neither a teacher store (manifest.json) nor a run directory (metrics.jsonl)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfaug", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("precompute", "stage 1: the teacher store"), ("train", "stage 2: DeepSpeed training"),
                       ("eval", "stage 3: base vs fine-tuned"), ("bench", "performance benchmarks")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="recipe YAML")
        p.add_argument("overrides", nargs="*", help="section.key=value")
        if name == "bench":
            p.add_argument("--only", default="", help="comma-separated: step,precompute,storage,fidelity,long")
            p.add_argument("--out", default="runs/bench.json")
            p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    p = sub.add_parser("inspect", help="summarize and verify a teacher store or a run directory")
    p.add_argument("path")
    # the deepspeed launcher appends --local_rank=N
    args, unknown = parser.parse_known_args(argv)
    unknown = [u for u in unknown if not u.startswith("--local_rank")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "inspect":
        return _inspect(args.path)

    from .config import ConfigError, load_config
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"selfaug: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "precompute":
        from .precompute import run
        run(cfg)
    elif args.command == "train":
        from .train import run
        run(cfg)
    elif args.command == "eval":
        from .evaluate import run
        run(cfg)
    elif args.command == "bench":
        from .bench import run
        run(cfg, [s for s in args.only.split(",") if s], args.out, args.config, args.overrides, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
