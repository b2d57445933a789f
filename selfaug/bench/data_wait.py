"""`selfaug bench --only prefetch` (docs/design.md, "Benchmarks"): the share of a training step spent waiting
for its micro-batches (`data_wait_s` / `step_time_s` of metrics.jsonl, the first step left out), with the
micro-batches made on the training thread (`train.prefetch=0`) and made ahead on a thread (`train.prefetch=2`),
on the store as it is and on a store read as from a slow disk (each example's read delayed: a network
filesystem). Each run in its own process; the same losses either way (tests/train/test_train.py).

A store on object storage (`bench_prefetch`'s object-store row): the recipe's store uploaded to an S3 API, the
run's `teacher.output_dir` its URL and an empty node cache, so the figures hold the mirror's download (pull_s,
before the first step) as well as the steps. By shards (`train.order=shards`, against the same order from local
disk): only the manifest and sidecars before step 1, each shard downloaded during the steps, ahead of them.

One run: python -m selfaug.bench.data_wait RECIPE PREFETCH DELAY_MS STEPS [overrides]
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid


def measure(cfg_path: str, prefetch: int, delay_ms: float, steps: int, overrides: list[str]) -> dict:
    from .. import store
    from ..config import load_config
    from ..store import TeacherStore
    from ..train import train
    real = TeacherStore.example

    def slow(self, i):  # every example read from the store waits, as on a slow shared filesystem
        time.sleep(delay_ms / 1000)
        return real(self, i)
    out_dir = tempfile.mkdtemp(prefix="selfaug-bench-wait-")
    cfg = load_config(cfg_path, list(overrides) + [f"train.prefetch={prefetch}", f"train.max_steps={steps + 1}",
                                                   f"train.output_dir={out_dir}", "train.resume=never",
                                                   "train.save_steps=0", "train.monitor_kl_every=0"])
    TeacherStore.example = slow if delay_ms else real
    pulled = {}
    try:
        if store.is_url(cfg.teacher.output_dir):  # the node's mirror, downloaded and checked before step 1
            t = time.perf_counter()
            mirror = store.pull(cfg.teacher.output_dir, shards=cfg.train.order != "shards")  # by shards: no shard
            pulled = {"pull_s": time.perf_counter() - t, "pulled_bytes": sum(
                os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(mirror) for f in files)}
        train(cfg)
    finally:
        TeacherStore.example = real
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))][1:]
    shares = os.path.join(out_dir, "shards.rank-0.json")  # train.order=shards from object storage: its downloads
    if os.path.exists(shares):
        pulled["shards"] = json.load(open(shares))
    shutil.rmtree(out_dir, ignore_errors=True)
    wait, step = sum(r["data_wait_s"] for r in rows), sum(r["step_time_s"] for r in rows)
    return {"prefetch": prefetch, "delay_ms_per_example": delay_ms, "steps": len(rows), "wait_share": wait / step,
            "step_time_s": step / len(rows), "data_wait_s": wait / len(rows), "nll": [r["nll"] for r in rows],
            **pulled}


@contextlib.contextmanager
def object_store_copy(store_dir: str):
    """The store at `store_dir` on an S3 API: itself where it is a URL already; else uploaded under a new prefix of
    $SELFAUG_BENCH_STORE_URL (with the usual AWS_* environment; the prefix is removed afterwards, nothing else in
    the bucket is touched) or, without it, to moto's S3 server started here on 127.0.0.1 (the dev extra), which
    measures the mirror's own work (requests, checks, writes) but no network. The node cache is a new folder
    under $SELFAUG_CACHE, removed afterwards. Yields (url, the run's
    environment), or (None, why not) where neither is at hand."""
    from .. import store
    from ..data import cache_dir
    from ..dist import free_port
    base = os.environ.get("SELFAUG_BENCH_STORE_URL")
    server, url, uploaded, env = None, None, False, {}
    try:
        if not store.is_url(store_dir) and not base:
            try:
                from moto.server import ThreadedMotoServer
            except ImportError:
                yield None, "moto is not installed (pip install 'selfaug[dev]') and SELFAUG_BENCH_STORE_URL is not set"
                return
            port = free_port()
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                       AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                       NO_PROXY=",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"])))
            base = "s3://selfaug-bench"
        os.makedirs(cache_dir(), exist_ok=True)
        env["SELFAUG_STORE_CACHE"] = tempfile.mkdtemp(prefix="bench-node-", dir=cache_dir())  # an empty node cache
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            if store.is_url(store_dir):
                url = store_dir
            else:
                url = f"{base.rstrip('/')}/selfaug-bench-{uuid.uuid4().hex[:12]}"
                fs = store.remote.filesystem(url)
                if server:
                    fs.mkdir(base.split("://", 1)[1].split("/")[0])
                uploaded = True
                for d, _, files in os.walk(store_dir):
                    for f in files:
                        if f != ".lock":
                            name = os.path.relpath(os.path.join(d, f), store_dir)
                            fs.put_file(os.path.join(d, f), f"{url}/{name}")
            yield url, env
        finally:
            if uploaded:
                try:
                    store.remote.filesystem(url).rm(url, recursive=True)
                except OSError as e:
                    print(f"  object store: could not remove the benchmark's copy {url}: {e}", flush=True)
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
            shutil.rmtree(env["SELFAUG_STORE_CACHE"], ignore_errors=True)
    finally:
        if server:
            server.stop()


def main(argv: list[str]) -> dict:
    return measure(argv[0], int(argv[1]), float(argv[2]), int(argv[3]), argv[4:])


if __name__ == "__main__":
    from .. import dist
    dist.ensure_env()
    print(json.dumps(main(sys.argv[1:])))
