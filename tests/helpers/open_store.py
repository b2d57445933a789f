"""Run on N ranks (torchrun): open a store, report what this rank checked; then rank 0 corrupts one shard
and every rank opens it again and reports the error line. Writes rank{R}.json into OUT."""
import json
import os
import sys

import torch.distributed as tdist

from selfaug import dist, store

store_dir, out = sys.argv[1], sys.argv[2]
rank, world = dist.init()
opened = store.TeacherStore(store_dir)
report = {"rank": rank, "world": world, "examples": len(opened), "shards": opened.work.shards,
          "bytes_hashed": opened.work.bytes_hashed, "positions_checked": opened.work.positions_checked}
tdist.barrier()  # every rank has opened (and memory-mapped) the store before it changes
if rank == 0:  # flip a byte in the middle of the last shard
    path = os.path.join(store_dir, opened.manifest["shards"][-1]["file"])
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path + ".new", "wb").write(bytes(data))
    os.replace(path + ".new", path)  # a new file: the maps of the first open stay valid
tdist.barrier()
try:
    store.TeacherStore(store_dir)
    report["error"] = None
except store.StoreError as e:
    report["error"] = str(e)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(report, f)
tdist.destroy_process_group()
