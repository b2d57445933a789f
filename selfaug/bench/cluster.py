"""`selfaug bench --only open,reader` (docs/design.md, "Benchmarks"): a cluster's costs.

  open    a store of `gb` GB (written by the production StoreWriter from synthetic, valid top-k rows: no
          model needed) opened by 1, 2 and 4 ranks (torchrun, gloo): seconds and bytes hashed per rank
  reader  rows -> collated micro-batch with its teacher (the production StoredSignal.batch) for a k = 64
          and a sampled N = 16 store: ms per micro-batch and stored positions per second, one core

Run as a module (python -m selfaug.bench.cluster open STORE OUT) each rank of an `open` launch writes
rank{R}.json.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from .. import dist, store

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def synthetic_settings(signal, vocab: int = 49152) -> dict:
    """Settings of a synthetic store (no model, tokenizer or data behind it)."""
    return {"model": {"name_or_path": "synthetic", "dtype": "float32", "vocab_size": vocab},
            "tokenizer": {}, "data": {"source": "synthetic"}, **signal.settings(), "positions": "prompt",
            "position_fraction": 1.0, "max_positions": None, "seed": 0 if signal.draws else None,
            "value_dtype": signal.value_dtype, "id_dtype": signal.id_dtype, "compression": "none",
            "shard_size": 64, "max_seq_len": 4096, "long_policy": "skip", "system_prompt": None}


def write_synthetic_store(path: str, signal, gb: float, prompt: int = 448, length: int = 512,
                          per_shard: int = 64) -> dict:
    """A store of about `gb` GB through the production StoreWriter (each shard's rows repeat one
    generated example, so writing costs little more than the disk)."""
    rng = np.random.default_rng(0)
    one = signal.random_rows(prompt, rng)
    per_example = signal.bytes_per_position(signal.concat([one])) * prompt
    n = max(per_shard, int(gb * 1e9 / per_example))
    shards = (n + per_shard - 1) // per_shard
    settings = synthetic_settings(signal)
    ids = np.arange(length, dtype=np.int32) % 1000
    with store.StoreWriter(path, settings, {"teacher": "synthetic", "world_size": 1}, overwrite=True) as writer:
        writer.open(shards)
        for j in range(shards):
            rows = min(per_shard, n - j * per_shard)
            first = j * per_shard
            shard = store.ShardRows(np.arange(first, first + rows, dtype=np.int64), [ids] * rows,
                                    np.full(rows, prompt, np.int32), [np.arange(prompt, dtype=np.int32)] * rows,
                                    signal.concat([one] * rows))
            writer.write(j, shard, first, rows, {"skipped": 0, "truncated": 0, "skipped_ids": [], "truncated_ids": []})
        with contextlib.redirect_stdout(io.StringIO()):  # the summary of a synthetic store is noise here
            writer.close(0.0)
    return store.read_manifest(path)["totals"]


def bench_open(gb: float, worlds=(1, 2, 4)) -> dict:
    """Seconds and bytes hashed per rank opening one store at each world size (torchrun, gloo)."""
    tmp = tempfile.mkdtemp(prefix="selfaug-bench-open-")
    try:
        path = os.path.join(tmp, "store")
        totals = write_synthetic_store(path, store.TopK(64), gb)
        rows = []
        for world in worlds:
            out = os.path.join(tmp, f"w{world}")
            os.makedirs(out)
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                            "--master_port", str(dist.free_port()), "-m", "selfaug.bench.cluster", "open", path, out],
                           check=True, capture_output=True, env={**env, "OMP_NUM_THREADS": "1"})
            ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]
            rows.append({"world": world, "seconds_max": max(r["seconds"] for r in ranks),
                         "bytes_hashed_max": max(r["bytes_hashed"] for r in ranks),
                         "positions_checked_max": max(r["positions_checked"] for r in ranks), "ranks": ranks})
            print(f"  open[{world} ranks]: {rows[-1]['seconds_max']:.1f} s, "
                  f"{rows[-1]['bytes_hashed_max'] / 1e9:.2f} GB hashed by the busiest rank", flush=True)
        for r in rows:
            r["work_ratio"] = r["bytes_hashed_max"] / rows[0]["bytes_hashed_max"]
            r["target"] = 1.2 / r["world"]
        return {"bytes": totals["bytes"], "positions": totals["positions"], "rows": rows}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_rank(path: str, out: str) -> None:
    rank, world = dist.init()
    dist.barrier()
    t0 = time.perf_counter()
    opened = store.TeacherStore(path)
    dist.barrier()
    seconds = time.perf_counter() - t0
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "seconds": seconds, "bytes_hashed": opened.work.bytes_hashed,
                   "positions_checked": opened.work.positions_checked, "shards": len(opened.work.shards)}, f)


def bench_reader(micro: int = 4, batches: int = 200) -> dict:
    """ms per collated micro-batch (with its teacher object) and stored positions per second, from an
    open store, for a k = 64 and a sampled N = 16 store: the production StoredSignal.batch."""
    import torch
    from ..train.batches import to_device
    from ..train.sources import StoredSignal
    tmp = tempfile.mkdtemp(prefix="selfaug-bench-reader-")
    rows = []
    try:
        for name, signal in (("topk64", store.TopK(64)), ("sampled16", store.Sampled(16))):
            path = os.path.join(tmp, name)
            write_synthetic_store(path, signal, 0.05)
            source = StoredSignal(store.TeacherStore(path))
            rng = np.random.default_rng(0)
            n = len(source.examples)
            order = [rng.choice(n, micro, replace=False) for _ in range(batches)]
            positions = 0
            t0 = time.perf_counter()
            for idx in order:
                batch = to_device(source.batch([source.examples.example(int(i)) for i in idx], 0), torch.device("cpu"))
                positions += batch["rows_b"].numel()
            dt = time.perf_counter() - t0
            rows.append({"signal": name, "micro_batch": micro, "ms_per_micro_batch": 1e3 * dt / batches,
                         "positions_per_s": positions / dt})
            print(f"  reader[{name}]: {rows[-1]['ms_per_micro_batch']:.2f} ms per micro-batch of {micro}, "
                  f"{rows[-1]['positions_per_s'] / 1e6:.2f} M positions/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"rows": rows, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    dist.ensure_env()
    if sys.argv[1] == "open":
        _open_rank(sys.argv[2], sys.argv[3])
