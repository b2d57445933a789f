"""train.micro_batch_tokens: micro-batches cut by processed tokens, balanced over the ranks, with the loss and
gradients of the step cut by count (the same global batch, the same normalization)."""
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ADAPTER, ROOT, launch, read_metrics, tiny_config, write_recipe
from selfaug import precompute, train
from selfaug.train.batches import PADDED, MaskedPacking, StepSampler, VarlenPacking, pack, processed_tokens

SKEWED = {"builtin_num_documents": 1, "builtin_max_documents": 8, "builtin_extra_sentences": 3,
          "builtin_train_size": 16}
SGD = {"optim": "sgd", "learning_rate": 2.0, "max_grad_norm": 1e9, "max_steps": 3, "micro_batch_size": 2, "alpha": 0.5}


def _reference_plan(batch, tokens, world, budget, layout):
    """The plan written plainly: longest first onto the least-loaded rank, then first fit, longest first,
    asking the layout itself for every micro-batch tried; empty ones (None) to equal counts."""
    order = sorted(range(len(batch)), key=lambda i: -tokens[batch[i]])
    shares, load = [[] for _ in range(world)], [0] * world
    for i in order:
        r = load.index(min(load))
        shares[r].append(i)
        load[r] += int(tokens[batch[i]])
    plan = []
    for share in shares:
        cut = []
        for i in share:
            fit = [mb for mb in cut if processed_tokens([tokens[batch[j]] for j in mb + [i]], layout) <= budget]
            fit[0].append(i) if fit else cut.append([i])
        plan.append([[int(batch[j]) for j in mb] for mb in cut])
    most = max(len(p) for p in plan)
    return [p + [None] * (most - len(p)) for p in plan]


@pytest.mark.parametrize("layout", [PADDED, MaskedPacking(300, 1e9), MaskedPacking(2000, 500),
                                    VarlenPacking()], ids=["padded", "masked-300", "masked-2000", "varlen"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_plan_covers_the_global_batch_once_within_the_budget_with_equal_counts(world, layout):
    rng = np.random.default_rng(world)
    tokens = rng.integers(20, 300, size=60)
    budget = 700
    s = StepSampler(60, micro=4, accum=3, world=world, seed=1, tokens=tokens, batch_tokens=budget, layout=layout)
    by_count = StepSampler(60, micro=4, accum=3, world=world, seed=1, tokens=tokens, layout=layout)
    for step in range(5):
        plan = s.plan(step)
        assert len({len(p) for p in plan}) == 1  # every rank runs as many micro-batches
        got = np.concatenate([mb for p in plan for mb in p if mb is not None])
        assert sorted(got.tolist()) == sorted(s.global_batch(step).tolist())
        for p in plan:
            for mb in p:
                if mb is not None:
                    assert 0 < processed_tokens(tokens[mb], layout) <= budget
        loads = [sum(int(tokens[mb].sum()) for mb in p if mb is not None) for p in plan]
        assert max(loads) - min(loads) <= tokens.max()  # balanced to within one example
        assert [[None if mb is None else mb.tolist() for mb in p] for p in plan] == _reference_plan(
            s.global_batch(step), tokens, world, budget, layout)
        stats, count = s.plan_stats(plan), by_count.plan_stats(by_count.plan(step))
        assert stats["mb_tokens_max"] <= budget < count["mb_tokens_max"] or count["mb_tokens_max"] <= budget
    for lens in ([90, 40, 30, 10], [5], [60, 60, 60], list(rng.integers(1, 90, size=9))):
        for cap in (90, 100, 170, 1000):  # against the layout pack itself picks
            row, off = pack(lens, cap)
            assert processed_tokens(lens, MaskedPacking(cap, float("inf"))) == (row.max() + 1) * max(off + np.array(lens))
        assert processed_tokens(lens) == len(lens) * max(lens) and processed_tokens(lens, VarlenPacking()) == sum(lens)


@pytest.fixture(scope="module")
def skewed_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("skewed")
    cfg = tiny_config(str(tmp), data=SKEWED, teacher={"value_dtype": "float32"})
    precompute.run(cfg)
    return cfg


def _tokens(store_cfg):
    from selfaug import store
    return store.TeacherStore(store_cfg.teacher.output_dir).lengths().tokens


def _longest(store_cfg):
    return int(_tokens(store_cfg).max())


def _uneven_budget(tokens, steps):
    """The smallest budget at which some rank of a 2-rank step has fewer micro-batches than the other."""
    for budget in range(int(tokens.max()), 8 * int(tokens.max())):
        s = StepSampler(len(tokens), 2, 1, 2, seed=42, tokens=tokens, batch_tokens=budget)
        if any(mb is None for t in range(steps) for p in s.plan(t) for mb in p):
            return budget
    raise AssertionError("no budget splits these steps unevenly")


def _params(run_dir, method):
    final = os.path.join(run_dir, "final")
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    return load_file(os.path.join(final, name))


def _cfg(tmp, store_cfg, name, **train_keys):
    return tiny_config(str(tmp), data=SKEWED,
                       teacher={"value_dtype": "float32", "output_dir": store_cfg.teacher.output_dir},
                       train={**SGD, "output_dir": str(tmp / name), **train_keys})


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_one_rank_budgeted_steps_equal_the_counted_ones(tmp_path, skewed_store, method, alpha):
    budget = _longest(skewed_store)  # the least allowed: most micro-batches hold one example
    common = {"adapter": ADAPTER[method], "alpha": alpha, "gradient_accumulation_steps": 2,  # full fine-tuning without ZeRO: the boundary too
              "deepspeed": os.path.join(ROOT, "ds_configs", "zero2.json" if method == "lora" else "zero0.json")}
    counted = train.train(_cfg(tmp_path, skewed_store, "count", **common))
    cut = train.train(_cfg(tmp_path, skewed_store, "tokens", micro_batch_tokens=budget, **common))
    a, b = _params(counted, method), _params(cut, method)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (k, (a[k] - b[k]).abs().max())
    rows_a, rows_b = read_metrics(counted), read_metrics(cut)
    assert [r["loss"] for r in rows_b] == pytest.approx([r["loss"] for r in rows_a], rel=1e-5)
    assert [r.get("kl", 0) > 0 for r in rows_b[1:]] == [alpha > 0] * 2  # alpha = 0: no KL between monitor steps
    assert all(r["mb_tokens_max"] <= budget for r in rows_b)
    assert max(r["mb_tokens_max"] for r in rows_a) > budget  # by count the budget would not hold
    assert any(r["micro_batches"] > 2 for r in rows_b) and all(r["micro_batches"] == 2 for r in rows_a)


def test_two_ranks_zero2_and_zero3_budgeted_equal_one_rank_counted(tmp_path, skewed_store):
    """The same global batch of 4 (2 ranks x micro 2, or 1 rank x micro 2 x accum 2), cut by tokens on 2
    ranks, with empty micro-batches where a rank has fewer: the parameters of the 1-rank run by count."""
    budget = _uneven_budget(_tokens(skewed_store), SGD["max_steps"])
    for method, ds, alpha in (("lora", "zero2", 0.0), ("full", "zero3", 0.5)):
        reference = train.train(_cfg(tmp_path, skewed_store, f"ref-{method}", adapter=ADAPTER[method], alpha=alpha,
                                     gradient_accumulation_steps=2))
        cfg = _cfg(tmp_path, skewed_store, f"two-{method}", adapter=ADAPTER[method], alpha=alpha,
                   micro_batch_tokens=budget,
                   deepspeed=os.path.join(ROOT, "ds_configs", f"{ds}.json"))
        launch("train", write_recipe(str(tmp_path / f"{method}.yaml"), cfg), nprocs=2)
        a, b = _params(reference, method), _params(cfg.train.output_dir, method)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (method, k, (a[k] - b[k]).abs().max())
        rows = read_metrics(cfg.train.output_dir)
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in read_metrics(reference)], rel=1e-5)
        assert all(r["mb_tokens_max"] <= budget for r in rows)
        assert sum(r["empty_micro_batches"] for r in rows) > 0, rows  # the uneven case really ran


def test_an_example_longer_than_batch_tokens_is_refused_before_the_model_loads(tmp_path, skewed_store):
    longest = _longest(skewed_store)
    cfg = _cfg(tmp_path, skewed_store, "short", micro_batch_tokens=longest - 1)
    with pytest.raises(train.TrainError, match=rf"train.micro_batch_tokens={longest - 1} is smaller than the longest "
                                               rf"example \({longest} tokens\)"):
        train.train(cfg)
    assert not os.path.exists(os.path.join(cfg.train.output_dir, "metrics.jsonl"))


@pytest.mark.parametrize("budget", [None, 700], ids=["by-count", "by-tokens"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_by_shards_each_rank_reads_its_own_contiguous_run_of_shards(world, budget):
    """train.order=shards, against the order written plainly: per epoch, the shards in a seeded order, each
    one's examples in a seeded order, dealt to the ranks in contiguous parts; each rank's steps take only its
    own part's examples, each once per epoch, and `shard_runs` names exactly the shards it reads, in order."""
    rows = [5, 7, 0, 6, 9, 4, 8, 3]  # an empty shard too
    n, micro, accum = sum(rows), 2, 2
    tokens = np.random.default_rng(0).integers(20, 300, size=n)
    s = StepSampler(n, micro, accum, world, seed=3, tokens=tokens, batch_tokens=budget, shard_rows=rows)
    part, per = n // world, micro * accum
    assert s.left_out == n - part * world
    first = np.concatenate([[0], np.cumsum(rows)[:-1]])
    shard_of = np.repeat(np.arange(len(rows)), rows)
    steps = 3 * part // per  # three epochs
    for r in range(world):
        stream = []
        for epoch in range(4):
            rng = np.random.default_rng([3, epoch])
            seq = np.concatenate([first[k] + rng.permutation(rows[k]) for k in rng.permutation(len(rows))])
            stream += seq[r * part:(r + 1) * part].tolist()
        got = []
        for t in range(steps):
            mine = [i for mb in s.plan(t)[r] if mb is not None for i in mb]
            assert sorted(mine) == sorted(stream[t * per:(t + 1) * per])  # its own stream, in step order
            got += stream[t * per:(t + 1) * per]
        for epoch in range(steps * per // part):
            one = got[epoch * part:(epoch + 1) * part]
            assert len(set(one)) == part  # each example of its part once per epoch
            shards = shard_of[one]
            assert (np.diff(shards) != 0).sum() + 1 == len(set(shards.tolist()))  # each shard read in one run
            assert len(set(shards.tolist())) <= -(-len([x for x in rows if x]) // world) + 2
        runs = s.shard_runs(r, 1, steps)
        want = [(int(shard_of[i]), per + j) for j, i in enumerate(got[per:])]
        seen = list(runs)
        for shard, a, b in seen:
            assert all(w[0] == shard for w in want[a - per:min(b, len(got)) - per])
        assert [x[1] for x in seen[1:]] == [x[2] for x in seen[:-1]]  # contiguous, from step 1's first position
        assert seen[0][1] == per and seen[-1][2] == len(got)  # to the last step's last position
    if world > 1:  # the ranks' parts of an epoch do not overlap
        epoch0 = [set(i for t in range(part // per) for mb in s.plan(t)[r] if mb is not None for i in mb)
                  for r in range(world)]
        assert not set.intersection(*epoch0)
