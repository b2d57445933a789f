"""A teacher store on object storage, against a real S3 API (moto's server, started here on 127.0.0.1, reached
through s3fs with AWS_ENDPOINT_URL as MinIO or Ceph would be): precompute to s3://, stopped and resumed, two
ranks train from it, each downloading only its share (train.order=shards), and end where the same run from a
local store ends; a shard changed in the bucket is refused
in one line; a download cut mid-shard is tried again; a URL whose package is missing is one line, never a
local folder named `s3:`."""
import http.client
import http.server
import json
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, clean_env, launch, tiny_config, write_recipe
from selfaug import precompute, store, train
from selfaug.dist import free_port

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
BUCKET = "selfaug-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 server and the environment that points boto3/s3fs at it (restored after the module)."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "SELFAUG_STORE_CACHE": str(tmp_path_factory.mktemp("node-cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield {"port": port, "env": env}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        server.stop()


def _fresh_cache(tmp_path, monkeypatch):
    """Another node: an empty node-local cache."""
    monkeypatch.setenv("SELFAUG_STORE_CACHE", str(tmp_path / "other-node"))


def _fs():
    import fsspec
    return fsspec.filesystem("s3", skip_instance_cache=True)


def _shas(manifest):
    return [(s["file"], s["sha256"]) for s in manifest["shards"]]


def test_precompute_to_s3_stopped_and_resumed_then_two_ranks_train_from_it(s3, tmp_path, monkeypatch):
    url = f"s3://{BUCKET}/store"
    data = {"builtin_train_size": 20}
    local_cfg = tiny_config(str(tmp_path / "local"), data=data, teacher={"value_dtype": "float32", "shard_size": 4})
    precompute.run(local_cfg)
    local_manifest = store.read_manifest(local_cfg.teacher.output_dir)
    cfg = tiny_config(str(tmp_path), data=data, teacher={"value_dtype": "float32", "shard_size": 4, "output_dir": url})
    recipe = write_recipe(str(tmp_path / "s3.yaml"), cfg)
    # stopped: SIGKILL once the bucket holds its first shard's sidecar
    proc = subprocess.Popen([sys.executable, "-m", "selfaug", "precompute", "--config", recipe], cwd=ROOT,
                            env=clean_env(**{**s3["env"], "SELFAUG_STORE_CACHE": str(tmp_path / "killed-node")}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not _fs().glob(f"{BUCKET}/store/shards/*.json") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    uploaded = len(_fs().glob(f"{BUCKET}/store/shards/*.json"))
    assert 1 <= uploaded < 5 and not _fs().exists(f"{BUCKET}/store/{store.MANIFEST}"), proc.stderr.read()[-3000:]
    # resumed on another node: what the bucket holds is kept (the dead run's lease taken over)
    _fresh_cache(tmp_path, monkeypatch)
    summary = precompute.run(cfg)
    assert summary["shards_reused"] == uploaded and summary["shards_computed"] == 5 - uploaded
    manifest = json.loads(_fs().cat_file(f"{BUCKET}/store/{store.MANIFEST}"))
    assert manifest["status"] == "complete" and _shas(manifest) == _shas(local_manifest)
    assert not _fs().exists(f"{BUCKET}/store/.lock")
    assert not os.path.exists(os.path.join(ROOT, "s3:")) and not os.path.exists("s3:")
    # 2 ranks from the bucket (a third node's cache), each downloading only its share (train.order=shards), against
    # the same 2-rank run from the local store
    train_keys = {"adapter": "lora", "optim": "sgd", "learning_rate": 0.5, "min_lr_ratio": 1.0, "max_steps": 2,
                  "micro_batch_size": 2, "order": "shards"}
    ref = tiny_config(str(tmp_path / "local"), data=data, teacher={"value_dtype": "float32", "shard_size": 4},
                      train={**train_keys, "output_dir": str(tmp_path / "ref")})
    launch("train", write_recipe(str(tmp_path / "ref.yaml"), ref), nprocs=2)
    two = tiny_config(str(tmp_path), data=data, teacher={"value_dtype": "float32", "shard_size": 4, "output_dir": url},
                      train={**train_keys, "output_dir": str(tmp_path / "two")})
    launch("train", write_recipe(str(tmp_path / "two.yaml"), two), nprocs=2,
           env={**s3["env"], "SELFAUG_STORE_CACHE": str(tmp_path / "third-node")})
    a = load_file(str(tmp_path / "ref" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "adapter_model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (k, (a[k] - b[k]).abs().max())
    got = [json.load(open(tmp_path / "two" / f"shards.rank-{r}.json")) for r in (0, 1)]
    # 2 steps of 2 examples: a rank reads 1 or 2 of the 5 shards, and downloads those alone
    assert all(1 <= len(g["downloaded"]) <= 2 and g["bytes_downloaded"] < g["store_bytes"] / 2 for g in got), got
    assert not set(got[0]["downloaded"]) & set(got[1]["downloaded"]), got  # the two parts share no shard here
    assert not os.listdir(tmp_path / "third-node" / (os.listdir(tmp_path / "third-node")[0].split(".")[0] + ".ranks"))


def test_a_shard_changed_in_the_bucket_is_refused_in_one_line(s3, tmp_path, monkeypatch):
    cfg = tiny_config(str(tmp_path), data={"builtin_train_size": 6},
                      teacher={"shard_size": 3, "output_dir": f"s3://{BUCKET}/changed"})
    precompute.run(cfg)
    name = f"{BUCKET}/changed/shards/shard-00001.arrow"
    body = bytearray(_fs().cat_file(name))
    body[-9] ^= 0xFF  # the same size, other bytes
    _fs().pipe_file(name, bytes(body))
    _fresh_cache(tmp_path, monkeypatch)
    with pytest.raises(store.StoreError, match=r"shard-00001.arrow: its bytes do not match the manifest .* after 4 "
                                               r"downloads"):
        store.pull(cfg.teacher.output_dir)


class _CuttingProxy(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def _proxy(target_port: int, cuts: list):
    """An HTTP proxy to the S3 server that cuts the first GET of a shard after half its body."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            conn = http.client.HTTPConnection("127.0.0.1", target_port)
            conn.request(self.command, self.path, body, {k: v for k, v in self.headers.items()})
            resp = conn.getresponse()
            data = resp.read()
            cut = self.command == "GET" and ".arrow" in self.path and not cuts and len(data) > 100
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection"):
                    self.send_header(k, v)
            self.end_headers()
            if cut:  # half the body, then the connection is gone
                cuts.append(self.path)
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    server = _CuttingProxy(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_download_cut_mid_shard_is_tried_again(s3, tmp_path, monkeypatch):
    cfg = tiny_config(str(tmp_path), data={"builtin_train_size": 6},
                      teacher={"shard_size": 3, "output_dir": f"s3://{BUCKET}/cut"})
    precompute.run(cfg)
    import fsspec
    cuts = []
    proxy = _proxy(s3["port"], cuts)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
        _fresh_cache(tmp_path, monkeypatch)
        fsspec.filesystem("s3").clear_instance_cache()
        local = store.pull(cfg.teacher.output_dir)
    finally:
        proxy.shutdown()
        fsspec.filesystem("s3").clear_instance_cache()  # the cached client points at the proxy: later tests' too
    assert len(cuts) == 1
    manifest = store.read_manifest(local)
    assert not store.verify_store(local, values=True)[1] and manifest["status"] == "complete"


@pytest.mark.parametrize("url,says", [("gs://b/store", "needs the package gcsfs: pip install gcsfs (or the object-store extra"),
                                      ("ftp://b/store", "ftp:// is neither")])
def test_a_url_without_its_package_is_one_line_not_a_local_folder(tmp_path, url, says, monkeypatch, capsys):
    from selfaug.cli import main
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(str(tmp_path / "r.yaml"), tiny_config(str(tmp_path), teacher={"output_dir": url}))
    import importlib.util
    if url.startswith("gs") and importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    assert main(["precompute", "--config", recipe]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not os.path.exists(os.path.join(tmp_path, url.split("://")[0] + ":"))


def test_estimate_states_the_download_and_the_cache_a_node_needs(tmp_path, capsys, monkeypatch):
    from selfaug import estimate
    cfg = tiny_config(str(tmp_path), teacher={"output_dir": f"s3://{BUCKET}/planned"})
    estimate.run(cfg, 8, seq_len=256, examples=100)
    out = capsys.readouterr().out
    assert "on object storage: each node downloads all of it once" in out and "8 ranks sharing the copy" in out
    cfg = tiny_config(str(tmp_path), teacher={"output_dir": f"s3://{BUCKET}/planned", "shard_size": 10},
                      train={"order": "shards"})
    e = estimate.run(cfg, 8, seq_len=256, examples=100)
    out = capsys.readouterr().out
    mib, shard = e["store_bytes"] / 2 ** 20, e["store_bytes"] / 2 ** 20 / 10
    assert f"by shards (10 shards of about {shard:,.1f} MiB): each rank downloads its share, at most " \
           f"{mib / 8 + 2 * shard:,.1f} MiB per epoch" in out, out
    assert f"holds at most 4 shards at once (a step's, and 2 ahead): $SELFAUG_STORE_CACHE needs {4 * shard:,.1f} MiB" \
        in out, out
    monkeypatch.setenv("SELFAUG_SHARDS_AHEAD", "two")  # one line, before anything loads
    with pytest.raises(store.StoreError, match="SELFAUG_SHARDS_AHEAD='two': the shards a rank downloads ahead"):
        train.setup(cfg)


def test_a_held_lease_is_renewed_while_a_shard_takes_longer_than_the_lease(s3, monkeypatch):
    """A stage 1 shard of a 70B teacher can take longer than LEASE_S: the holder's thread renews the lease, so a
    second run is still refused after LEASE_S; released, it is free; a lease taken over is not removed by its
    former holder."""
    from selfaug.store import remote
    monkeypatch.setattr(remote, "LEASE_S", 1.5)
    monkeypatch.setattr(remote, "RENEW_S", 0.2)
    url = f"s3://{BUCKET}/leased"
    first = remote.Lease(url)
    first.acquire()
    time.sleep(2.5)  # longer than LEASE_S, without a shard written
    with pytest.raises(store.StoreError, match="a precompute is writing this store"):
        remote.Lease(url).acquire()
    first.release()
    assert not first._thread.is_alive()  # no renewal left to write the lease back
    monkeypatch.setattr(remote, "RENEW_S", 60)  # the second's renewals would write a removed lease back at once
    second = remote.Lease(url)
    second.acquire()
    first.held = True  # a holder that lost its lease (its renewals failed) and releases late
    first.release()
    assert _fs().exists(url + "/.lock")  # still the second run's
    second.release()
    assert not _fs().exists(url + "/.lock")


def test_by_shards_a_rank_downloads_only_its_share_a_few_ahead_and_removes_what_it_has_read(s3, tmp_path, monkeypatch):
    """train.order=shards from the bucket, two ranks walked by their plans in this process: each downloads exactly the
    shards its steps read (each once), holds at most the step's shards plus the ones ahead, has the next shard before
    its step asks, removes each when its run is over, and reads the same examples as the local store."""
    url = f"s3://{BUCKET}/share"
    cfg = tiny_config(str(tmp_path), data={"builtin_train_size": 24}, teacher={"shard_size": 3, "output_dir": url})
    precompute.run(cfg)
    _fresh_cache(tmp_path, monkeypatch)
    local = store.TeacherStore(store.pull(url))  # the whole store, to compare with
    from selfaug.train.batches import StepSampler
    steps, ahead = 5, 2
    monkeypatch.setenv("SELFAUG_SHARDS_AHEAD", str(ahead))
    _fresh_cache(tmp_path, monkeypatch)
    for rank in (0, 1):
        share = store.open_share(url, store.pull(url, shards=False))
        assert isinstance(share, store.RankShards) and all(map(np_equal, share.lengths(), local.lengths()))
        sampler = StepSampler(len(share), 1, 2, 2, seed=7, shard_rows=share.shard_rows())
        share.follow(sampler, rank, 0, steps)
        folder = os.path.join(share.cache.folder, "shards")
        on_disk = lambda: {n for n in (os.listdir(folder) if os.path.isdir(folder) else ()) if n.endswith(".arrow")}
        read, bound = [], 2 + ahead  # a step crosses at most from one shard to the next here (2 examples a step)
        for step in range(steps):
            share.begin_step(step)
            still = {f"shard-{int(sampler.shard_of[i]):05d}.arrow" for t in range(step, steps)
                     for mb in sampler.plan(t)[rank] for i in mb}
            assert on_disk() <= still  # what the rank has finished with is gone from the disk
            if step == 2:  # the downloads run ahead of the reader: the next shard is there before the step reads it
                nxt = next(s for s in (sampler.shard_of[i] for t in range(step, steps)
                                       for mb in sampler.plan(t)[rank] for i in mb) if s not in read[-1:])
                deadline = time.time() + 30
                while int(nxt) not in share.cache.ready and time.time() < deadline:
                    time.sleep(0.05)
                assert int(nxt) in share.cache.ready
            for mb in sampler.plan(step)[rank]:
                for i in mb:
                    got, want = share.example(int(i)), local.example(int(i))
                    assert got.keys() == want.keys() and all(np_equal(got[k], want[k]) for k in want)
                    s = int(sampler.shard_of[i])
                    read += [s] if read[-1:] != [s] else []
            assert len(on_disk()) <= bound
        share.close()
        assert share.cache.stats["downloaded"] == read  # its share, each shard once, in the order it reads them
        assert len(set(read)) < len(share.shard_rows()) and share.cache.stats["most_held"] <= bound
        assert not os.path.exists(share.cache.folder)  # nothing left on the node's disk
    # the sidecars are fetched once per mirror: a second pull keeps them; one that names another shard is fetched again
    mirror = store.pull(url, shards=False)
    side = os.path.join(mirror, "shards", "shard-00000.json")
    kept = {n: os.stat(os.path.join(mirror, "shards", n)).st_mtime_ns for n in os.listdir(os.path.join(mirror, "shards"))}
    body = json.load(open(side))
    json.dump({**body, "sha256": "another"}, open(side, "w"))
    assert store.pull(url, shards=False) == mirror and json.load(open(side))["sha256"] == body["sha256"]
    assert {n: os.stat(os.path.join(mirror, "shards", n)).st_mtime_ns for n in kept if n != "shard-00000.json"} == \
        {n: t for n, t in kept.items() if n != "shard-00000.json"}
    # lengths that differ from the shard's own (the plan and the loss's normalization come from them) are refused
    wrong = store.Lengths(share.lengths().tokens + 1, share.lengths().prompt, share.lengths().kl)
    bad = store.RankShards(url, mirror, share.manifest, wrong, "sha256")
    bad.follow(StepSampler(len(bad), 1, 2, 2, seed=7, shard_rows=bad.shard_rows()), 0, 0, 1)
    bad.begin_step(0)
    with pytest.raises(store.StoreError, match="its examples' lengths differ from its sidecar's"):
        bad.example(int(StepSampler(len(bad), 1, 2, 2, seed=7, shard_rows=bad.shard_rows()).plan(0)[0][0][0]))
    bad.close()
    # a sidecar without lengths, or naming another shard than the manifest does: no per-rank plan (the whole store)
    from selfaug.store.cache import _sidecar_lengths
    assert _sidecar_lengths(mirror, share.manifest) is not None
    json.dump({k: v for k, v in body.items() if k != "lengths"}, open(side, "w"))
    assert _sidecar_lengths(mirror, share.manifest) is None
    json.dump({**body, "sha256": "another"}, open(side, "w"))
    assert _sidecar_lengths(mirror, share.manifest) is None
    json.dump(body, open(side, "w"))
    # a reader is never left waiting: closed while it waits, a shard outside the plan, a step back
    manifest = share.manifest
    root = str(tmp_path / "ranks")

    def later():  # a plan whose first shard is read at step 5: with nothing ahead, nothing is fetched yet
        yield 3, 10, 12
    cache = store.ShardCache(url, manifest, later(), 2, 0, root, ahead=0)
    threading.Timer(0.5, cache.close).start()
    with pytest.raises(store.StoreError, match="asked for after the rank's downloads were closed"):
        within(10, lambda: cache.path(3))
    cache = store.ShardCache(url, manifest, iter([(1, 0, 2)]), 2, 0, root, ahead=2)
    assert cache.path(1).endswith("shard-00001.arrow")
    with pytest.raises(store.StoreError, match="shard 4 is not in this rank's plan at step 0"):
        within(10, lambda: cache.path(4))
    cache.begin_step(1)
    with pytest.raises(store.StoreError, match="step 0 was asked for after step 1"):
        cache.begin_step(0)
    # the folder of this host's process that is gone (nobody holds its .alive) is removed by the next start; a live
    # one is kept, and another host's is its own to clean
    import socket
    dead, elsewhere = (os.path.join(root, f"{host}-1-0") for host in (socket.gethostname(), "another-host"))
    for folder in (dead, elsewhere):
        os.makedirs(folder)
        open(os.path.join(folder, ".alive"), "w").close()
    other = store.ShardCache(url, manifest, iter([]), 2, 0, root, ahead=0)
    assert not os.path.exists(dead) and os.path.exists(elsewhere)
    assert os.path.exists(cache.folder) and os.path.exists(other.folder)
    cache.close(), other.close()
    assert os.listdir(root) == ["another-host-1-0"]
    # an error of the client's own kind (aiohttp's, botocore's: not OSErrors) is tried again like any other
    from aiohttp import ClientPayloadError

    class OnceBroken:
        def __init__(self, fs):
            self.fs, self.calls = fs, 0

        def get_file(self, *a, **kw):
            self.calls += 1
            if self.calls == 1:
                raise ClientPayloadError("Response payload is not completed")
            return self.fs.get_file(*a, **kw)
    flaky, entry = OnceBroken(store.remote.filesystem(url)), manifest["shards"][2]
    got = store.remote.download(flaky, url, str(tmp_path / "retried"), entry["file"], entry["sha256"], entry["bytes"])
    assert flaky.calls == 2 and os.path.getsize(got) == entry["bytes"]


def within(seconds, fn):
    """fn() on a thread: its result or its exception, or a failure (not a hang) when it takes longer."""
    got = {}

    def run():
        try:
            got["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - raised below, on the test's thread
            got["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still waiting after {seconds} s"
    if "error" in got:
        raise got["error"]
    return got["value"]


def np_equal(a, b):
    import numpy as np
    return np.array_equal(np.asarray(a), np.asarray(b))
