"""A file system without flock (Lustre mounted without -o flock, some NFS setups) makes flock fail with ENOSYS or
EBADF: every lock selfaug takes then warns once and goes on, instead of ending the stage in a traceback."""
import errno
import fcntl

import pytest

from selfaug import locks
from selfaug.hashing import file_hashes


@pytest.fixture
def no_flock(monkeypatch):
    def refuse(fd, flags):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", refuse)
    locks._WARNED.clear()


def test_locks_and_hashes_go_on_with_one_warning(tmp_path, no_flock, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    assert set(file_hashes(str(tmp_path), ["model.safetensors"])) == {"model.safetensors"}
    lock = locks.DirLock(str(tmp_path / "run"), "train").acquire()
    lock.release()
    err = capsys.readouterr().err
    assert "has no flock (Function not implemented): its lock is not enforced" in err

