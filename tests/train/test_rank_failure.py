"""A rank's error in a phase rank 0 runs alone reaches every rank: a 2-rank run whose rank 0 alone fails to write
final/ (a file-size limit on rank 0 only, a real EFBIG) ends both ranks at once with the same line, without a
launcher to kill the waiting rank (the ranks started directly), instead of rank 1 waiting out train.ddp_timeout."""
import time

import pytest

from conftest import kill_ranks, spawn, tiny_config, write_recipe

# loaded by each rank's interpreter at start-up (PYTHONPATH): on rank 0 alone, writes past LIMIT bytes fail with
# EFBIG from the moment final/ is staged (Python ignores SIGXFSZ, so the write raises)
SITE = """
import os
if os.environ.get("RANK") == "0" and os.environ.get("LIMIT"):
    import resource
    from selfaug.train import final
    staging_dir = final.staging_dir

    def limited(path):
        limit = int(os.environ["LIMIT"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return staging_dir(path)
    final.staging_dir = limited
"""


@pytest.mark.slow
def test_rank_0_failing_alone_to_write_final_ends_both_ranks_within_30_s(tmp_path):
    cfg = tiny_config(str(tmp_path), train={"teacher_mode": "none", "alpha": 0, "adapter": "none", "max_steps": 1,
                                            "ddp_timeout": 600})
    recipe = write_recipe(str(tmp_path / "r.yaml"), cfg)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITE)
    procs, port = spawn("train", recipe, nprocs=2, env={"PYTHONPATH": str(tmp_path / "site"), "LIMIT": str(1 << 20)})
    try:
        deadline = time.time() + 400
        while procs[0][0].poll() is None and time.time() < deadline:
            time.sleep(0.2)
        first = time.time()
        while procs[1][0].poll() is None and time.time() < first + 30:
            time.sleep(0.2)
        codes = [p.poll() for p, _, _ in procs]
        errs = [(e.seek(0), e.read())[1] for _, _, e in procs]
    finally:
        kill_ranks(procs)
    assert codes == [2, 2], (codes, errs[0][-2000:], errs[1][-2000:])
    for err in errs:
        lines = [x for x in err.splitlines() if x.startswith("selfaug: error: ")]
        assert len(lines) == 1 and "final could not be written (File too large" in lines[0], err[-2000:]
