"""The teacher store, where stage 1 and stage 2 meet (docs/design.md, "The teacher store"): a small
package, one job a module.

  format.py   the position rule, the schema, a shard's rows and their flat arrays
  settings.py what a store depends on, and their one comparison
  signals.py  one class per teacher signal (TopK, Sampled): everything that differs between them
  files.py    shards and JSON written atomically, the manifest, memory-mapped shards, the lock
  checks.py   hashes, schema and values; the shared check of a store opened on many ranks
  writer.py   StoreWriter (stage 1 hands it rows) and the summary
  reader.py   TeacherStore (stage 2 reads examples and signals)
  remote.py   a store on object storage: the node's mirror, uploads, checked downloads, the lease
  cache.py    a rank's share of a store on object storage (train.order=shards): downloaded ahead, removed after
"""
from .checks import check_shard, verify_shard, verify_shared, verify_store
from .files import StoreLock, TornManifest, read_manifest, read_shard, write_json_atomic, write_shard
from .format import MANIFEST, VERSION, Lengths, PositionRule, ShardRows, StoreError, flatten, id_dtype_for, schema
from .settings import MATCHED, check_store, settings_diff, store_settings
from .reader import TeacherStore
from .remote import Lease, is_url, local_store, pull
from .cache import RankShards, ShardCache, open_share
from .signals import Sampled, TopK, sample_uniforms, signal_for, signal_of
from .writer import StoreWriter, format_summary, rebuild_manifest

__all__ = ["RankShards", "ShardCache", "open_share", "Lease", "is_url", "local_store", "pull", "MANIFEST", "MATCHED", "VERSION", "Lengths", "PositionRule", "Sampled", "ShardRows", "StoreError",
           "StoreLock", "StoreWriter", "TeacherStore", "TornManifest", "TopK", "check_shard", "check_store", "flatten",
           "format_summary", "id_dtype_for", "read_manifest", "read_shard", "rebuild_manifest", "sample_uniforms", "schema",
           "settings_diff", "signal_for", "signal_of", "store_settings", "verify_shard", "verify_shared",
           "verify_store", "write_json_atomic", "write_shard"]
