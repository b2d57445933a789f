"""A compressed store (teacher.compression) is decompressed once per node into the cache and memory-mapped by every
rank there: no rank holds a decompressed copy in its own memory (8 of them on a node of 8 ranks)."""
import glob
import os

import numpy as np
import pyarrow as pa
import pytest

from conftest import tiny_config
from selfaug import precompute, store


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    out = {}
    for compression in ("none", "zstd"):
        tmp = str(tmp_path_factory.mktemp(compression))
        cfg = tiny_config(tmp, data={"builtin_train_size": 40}, teacher={"compression": compression, "k": 64,
                                                                        "shard_size": 10})
        precompute.run(cfg)
        out[compression] = cfg.teacher.output_dir
    return out


def test_ranks_map_one_decompressed_copy_per_node(stores, tmp_path, monkeypatch):
    monkeypatch.setenv("SELFAUG_CACHE", str(tmp_path / "cache"))
    plain = store.TeacherStore(stores["none"])
    held = []
    for rank in range(2):  # two readers on one node
        before = pa.total_allocated_bytes()
        opened = store.TeacherStore(stores["zstd"])
        held.append((opened, pa.total_allocated_bytes() - before))
    decompressed = sum(os.path.getsize(os.path.join(stores["none"], e["file"])) for e in plain.manifest["shards"])
    for opened, allocated in held:
        assert allocated < 0.05 * decompressed, (allocated, decompressed)  # mapped, not read into memory
        for i in range(len(plain)):
            a, b = plain.example(i), opened.example(i)
            assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    copies = glob.glob(str(tmp_path / "cache" / "shards" / "*.arrow"))
    assert len(copies) == len(plain.manifest["shards"])  # one per shard, for both readers
