"""A teacher store on object storage (docs/design.md, "Stores on object storage"): `teacher.output_dir` (and the
store path of `selfaug train` and `SelfAugTrainer`) may be `s3://`, `gs://` or `az://` through fsspec.

The store is the same store; the bucket holds the same files. Each node works on a local mirror of it
(`$SELFAUG_STORE_CACHE/<hash of the URL>/`, by default under `$SELFAUG_CACHE/stores`): stage 1 writes a shard there, verifies it as a local store's is
verified, uploads it with its sidecar, and only then is it counted (the manifest, uploaded last, names only
uploaded shards); a stopped precompute resumes from what the bucket holds, on any machine. Stage 2 downloads the
manifest and the shards once per node (under a file lock: the node's other ranks wait, then read the same
mirror), each checked against its sha256 as it arrives: a download cut short is retried, a shard whose bytes do
not match the manifest is refused in one line. Credentials and endpoints come from the usual environment
(AWS_* including AWS_ENDPOINT_URL for MinIO or Ceph, the GCS and Azure defaults) and are never written anywhere.
A stage 1 run holds a lease object (`.lock`) in the store, renewed by a thread every `RENEW_S` while it runs
(however long a shard takes), refused to a second run while it is younger than `LEASE_S`; object stores have no
flock, so two runs started within the same second can both take it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid

from ..durable import tmp_name, write_atomic
from ..hashing import sha256_file
from ..locks import flock
from .format import MANIFEST, StoreError

SCHEMES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
           "abfss": "adlfs"}  # URL scheme -> the fsspec package that serves it
EXTRA = "the object-store extra: pip install '.[object-store]' from a clone"
LEASE_S = 600  # a stage 1 lease older than this is a stopped run's: taken over
RENEW_S = 60  # its holder renews it this often, from a thread: nine renewals can fail before it lapses
ATTEMPTS = 4  # downloads of one file before its bytes are called wrong


def is_url(path: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(path)))


def filesystem(url: str):
    """The fsspec filesystem of `url`; one line for a scheme selfaug does not serve or whose package is missing."""
    scheme = url.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise StoreError(f"{url}: a teacher store lives in a directory or on object storage "
                         f"({', '.join(s + '://' for s in ('s3', 'gs', 'az'))}); {scheme}:// is neither")
    try:
        import fsspec
        __import__(SCHEMES[scheme])
    except ImportError:
        raise StoreError(f"{url}: {scheme}:// needs the package {SCHEMES[scheme]}: pip install {SCHEMES[scheme]} (or "
                         f"{EXTRA})") from None
    return fsspec.filesystem(scheme)


def mirror(url: str) -> str:
    """This node's local mirror of the store at `url`, under $SELFAUG_STORE_CACHE (default $SELFAUG_CACHE/stores:
    point it at node-local disk)."""
    from ..data import cache_dir
    root = os.environ.get("SELFAUG_STORE_CACHE") or os.path.join(cache_dir(), "stores")
    return os.path.join(root, hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16])


def _remote(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def download(fs, url: str, local: str, name: str, sha256: str | None = None, size: int | None = None,
             attempts: int = ATTEMPTS, wait=lambda attempt: 0.2 * attempt, stop: threading.Event | None = None) -> str:
    """`name` of the store at `url` into the mirror `local`, written whole (temporary name, rename); with `sha256`
    the bytes are checked, and a download that fails, comes back short or wrong is tried again (`attempts` in all,
    `wait(n)` seconds after the n-th; `stop` set ends the waiting with a StoreError)."""
    target = os.path.join(local, name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    for attempt in range(1, attempts + 1):
        tmp = tmp_name(target)
        try:
            fs.get_file(_remote(url, name), tmp)
            if sha256 is None or (os.path.getsize(tmp) == size and sha256_file(tmp) == sha256):
                os.replace(tmp, target)
                return target
        except Exception as e:  # noqa: BLE001 - a connection cut or refused: botocore's, aiohttp's, the clients' own
            if attempt == attempts:
                raise StoreError(f"{_remote(url, name)} could not be read ({type(e).__name__}: {e}) after "
                                 f"{attempts} attempts; check the endpoint and credentials (AWS_*)") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if attempt < attempts:
            if stop is None:
                time.sleep(wait(attempt))
            elif stop.wait(wait(attempt)):
                raise StoreError(f"{_remote(url, name)}: the download was stopped")
    raise StoreError(f"{_remote(url, name)}: its bytes do not match the manifest (sha256 {sha256[:12]}..., "
                     f"{size} bytes) after {attempts} downloads: the object was changed or corrupted in the "
                     "bucket; run `selfaug precompute` with the same recipe to rewrite the shards that fail")


def _local_ok(local: str, name: str, sha256: str, size: int, checked: dict) -> bool:
    """The mirror's file has these bytes: hashed once, then known by its (size, mtime, inode) in `checked`."""
    path = os.path.join(local, name)
    if not os.path.isfile(path):
        return False
    if checked.get(name) == _stamp(local, name, sha256):
        return True
    if os.path.getsize(path) == size and sha256_file(path) == sha256:
        checked[name] = _stamp(local, name, sha256)
        return True
    return False


def _stamp(local: str, name: str, sha256: str) -> list:
    st = os.stat(os.path.join(local, name))
    return [sha256, st.st_size, st.st_mtime_ns, st.st_ino]


def pull(url: str, shards: bool = True) -> str:
    """The mirror of the store at `url`, brought up to date from the bucket (its manifest, config, sidecars and,
    with `shards`, every shard it names, each checked), once per node: the node's other processes wait on a file
    lock and find it done. Returns the mirror's path."""
    fs = filesystem(url)
    local = mirror(url)
    os.makedirs(local, exist_ok=True)
    with open(local + ".pull.lock", "a") as lock:  # beside the mirror: the mirror holds the store's files alone
        flock(lock.fileno(), fcntl.LOCK_EX, local)
        names = [os.path.relpath(p, url.split("://", 1)[1].rstrip("/"))
                 for p in fs.find(url) if not p.endswith("/.lock")]
        for name in names:  # the small files at the top: manifest, config
            if name.endswith((".json", ".yaml")) and "/" not in name:
                download(fs, url, local, name)
        _sidecars(fs, url, local, [n for n in names if n.startswith("shards/") and n.endswith(".json")])
        record = local + ".checked.json"  # the mirror's files already hashed: a node's other ranks hash nothing
        try:
            with open(record) as f:
                checked = json.load(f)
        except (OSError, ValueError):
            checked = {}
        manifest_path = os.path.join(local, MANIFEST)
        manifest = {}
        if os.path.exists(manifest_path):
            with open(manifest_path) as f:
                manifest = json.load(f)
        if shards and manifest.get("status") == "complete":
            for entry in manifest["shards"]:
                if not _local_ok(local, entry["file"], entry["sha256"], entry["bytes"], checked):
                    download(fs, url, local, entry["file"], entry["sha256"], entry["bytes"])  # checked as it came
                    checked[entry["file"]] = _stamp(local, entry["file"], entry["sha256"])
        elif shards:  # an incomplete store: the shards its sidecars name (what a resumed precompute keeps)
            for name in names:
                side = os.path.join(local, name)
                if name.startswith("shards/") and name.endswith(".json"):
                    with open(side) as f:
                        entry = json.load(f)
                    if not _local_ok(local, entry["file"], entry["sha256"], entry["bytes"], checked):
                        download(fs, url, local, entry["file"], entry["sha256"], entry["bytes"])
                        checked[entry["file"]] = _stamp(local, entry["file"], entry["sha256"])
        write_atomic(record, json.dumps(checked))
    return local


def _sidecars(fs, url: str, local: str, names: list[str]) -> None:
    """The shards' sidecars into the mirror: those of a complete store that the mirror already holds for the
    manifest's shards (the same sha256) are kept, the others fetched together (fsspec's batched get) and renamed
    into place whole. A store of 100 GB has about 1,500 of them: fetched one by one, by every rank, they would
    take minutes before step 1."""
    try:
        with open(os.path.join(local, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = {}
    named = {e["file"][: -len(".arrow")] + ".json": e["sha256"] for e in manifest.get("shards", [])} \
        if manifest.get("status") == "complete" else {}
    wanted = []
    for name in names:
        try:
            with open(os.path.join(local, name)) as f:
                if named.get(name) is not None and json.load(f).get("sha256") == named[name]:
                    continue
        except (OSError, ValueError):
            pass
        wanted.append(name)
    if not wanted:
        return
    os.makedirs(os.path.join(local, "shards"), exist_ok=True)
    tmps = [tmp_name(os.path.join(local, n)) for n in wanted]
    try:
        fs.get([_remote(url, n) for n in wanted], tmps)
        for n, tmp in zip(wanted, tmps):
            os.replace(tmp, os.path.join(local, n))
    except Exception:  # noqa: BLE001 - a batch cut short, however the client says it: one by one, each with retries
        for n in wanted:
            download(fs, url, local, n)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


def push(url: str, local: str, name: str) -> None:
    """One file of the mirror uploaded to the store at `url` (the object appears whole or not at all)."""
    filesystem(url).put_file(os.path.join(local, name), _remote(url, name))


class Lease:
    """The one stage 1 writing the store at `url`: a `.lock` object naming the holder (host, pid, since, renewed),
    renewed every RENEW_S by a daemon thread while held; a second run is refused while it is younger than
    LEASE_S, an older one is taken over with a message. Released only while it is still this holding (its token)."""

    def __init__(self, url: str):
        self.fs, self.path = filesystem(url), _remote(url, ".lock")
        self.held = False
        self._stop = threading.Event()

    def acquire(self) -> None:
        if self.fs.exists(self.path):
            try:
                holder = json.loads(self.fs.cat_file(self.path))
            except (ValueError, OSError):
                holder = {}
            age = time.time() - float(holder.get("renewed", 0))
            if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
                age = LEASE_S  # this machine's, and its process is gone: stale now, not in LEASE_S
            if age < LEASE_S:
                raise StoreError(f"{self.path}: a precompute is writing this store (host {holder.get('host')}, pid "
                                 f"{holder.get('pid')}, since {holder.get('since')}); wait for it, or, if it was "
                                 f"stopped, run again after {int(LEASE_S - age)} s (its lease expires)")
            print(f"{self.path}: taking over the lease of a stopped precompute (host {holder.get('host')}, pid "
                  f"{holder.get('pid')})", flush=True)
        self.since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.token = uuid.uuid4().hex  # this holding of it: a lease taken over by another run has another
        self.renew()
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._keep, name="selfaug-lease", daemon=True)
        self._thread.start()

    def renew(self) -> None:
        self.fs.pipe_file(self.path, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": self.since,
                                                 "renewed": time.time(), "token": self.token}).encode())

    def _keep(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - the next renewal tries again; LEASE_S leaves room for nine
                print(f"{self.path}: could not renew the lease ({type(e).__name__}); trying again in {RENEW_S} s",
                      flush=True)

    def release(self) -> None:
        if self.held:
            self.held = False
            self._stop.set()
            self._thread.join(timeout=60)  # a renewal under way would write the lease back after its removal
            try:  # never another run's: one that took over a lease this process failed to renew keeps it
                holder = json.loads(self.fs.cat_file(self.path))
                if holder.get("token") == self.token:
                    self.fs.rm_file(self.path)
            except (OSError, ValueError):
                pass


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def local_store(path: str) -> str:
    """The directory to read a store from: `path` itself, or for a URL this node's mirror, pulled (`pull`)."""
    return pull(path) if is_url(path) else path
