"""Files that name other files survive a power loss (docs/design.md, "Files that survive a crash"): each is
written to a temporary name, fsynced, renamed, and its directory fsynced; a failed write leaves the old file."""
import errno
import os

import pytest

from conftest import tiny_config
from selfaug import durable, train
from selfaug.store import StoreError, write_json_atomic


@pytest.fixture
def fsynced(monkeypatch):
    """The paths fsynced from now on (files by their name at fsync time, directories too)."""
    seen, real = [], os.fsync

    def record(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", record)
    return seen


def _durably_written(seen, path):
    """`path` was fsynced under its temporary name, then its directory after the rename."""
    tmp = [i for i, p in enumerate(seen) if p == durable.tmp_name(path)]
    folder = [i for i, p in enumerate(seen) if p == os.path.dirname(path)]
    return bool(tmp and folder and folder[-1] > tmp[0])


def test_the_files_that_name_other_files_are_fsynced_with_their_directory(tmp_path, tiny_store, fsynced):
    cfg = tiny_config(str(tmp_path), teacher={"output_dir": tiny_store.teacher.output_dir},
                      train={"max_steps": 1, "save_steps": 1})
    train.train(cfg)
    out = cfg.train.output_dir
    for path in (os.path.join(out, "config.yaml"), os.path.join(out, "checkpoints", "latest"),
                 os.path.join(out, "checkpoints", "step-1", "selfaug.json")):
        assert _durably_written(fsynced, path), (path, fsynced)
    # final/: every file fsynced where it was written, its marker last, then the rename into place
    staged = [p for p in fsynced if p.startswith(os.path.join(out, "final.tmp-"))]
    marker = next(i for i, p in enumerate(fsynced) if p.endswith("/COMPLETE.tmp") or "/COMPLETE." in p)
    assert any(p.endswith("/adapter_model.safetensors") for p in fsynced[:marker]) and staged
    assert out in fsynced[marker:] and durable.is_complete(os.path.join(out, "final"))
    # the checkpoint's own files were flushed before `latest` named it
    latest = fsynced.index(durable.tmp_name(os.path.join(out, "checkpoints", "latest")))
    assert any(p.startswith(os.path.join(out, "checkpoints", "step-1") + "/") for p in fsynced[:latest])
    manifest = str(tmp_path / "m.json")
    write_json_atomic(manifest, {"a": 1})
    assert _durably_written(fsynced, manifest)


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "manifest.json")
    write_json_atomic(path, {"old": True})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreError, match="the previous file, if any, is unchanged"):
        write_json_atomic(path, {"new": True})
    assert open(path).read() == '{\n  "old": true\n}' and os.listdir(tmp_path) == ["manifest.json"]
