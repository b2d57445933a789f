"""Real-shaped RAG data (docs/design.md, "Packing, position sampling and the sampled signal"):
length-skewed built-in data; packed steps equal padded ones; a position-sampled store holds exactly
the rule's positions, the same on reruns and at any world size; a sampled store's draws follow the
teacher's distribution; and each bad setting gets one line naming its key."""
import copy
import glob
import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import launch, tiny_config, write_recipe
from selfaug import precompute, train
from selfaug.data import builtin
from selfaug import store as ts
from selfaug.config import ConfigError
from selfaug.data import load_examples
from selfaug.models import load_model, load_tokenizer
from selfaug.train.batches import PADDED, MaskedPacking, StepSampler, VarlenPacking, collate, model_inputs, to_device
from selfaug.train.sources import DataExamples, LiveModel, PlainData, StoredSignal
from selfaug.store import signals

SAMPLES = 16
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers"))
import cpu_flash  # noqa: E402  registers the CPU attention function with flash-attention's contract


@pytest.fixture(scope="session")
def sampled_store(tmp_path_factory):
    """tiny_store's data and model, signal=sampled (N=16, fp32 values)."""
    cfg = tiny_config(str(tmp_path_factory.mktemp("sampled")),
                      teacher={"value_dtype": "float32", "signal": "sampled", "samples": SAMPLES})
    precompute.run(cfg)
    return cfg


@pytest.fixture(scope="session")
def quarter_store(tmp_path_factory):
    """tiny_store's data and model, position_fraction=0.25 (fp32 values)."""
    cfg = tiny_config(str(tmp_path_factory.mktemp("quarter")), teacher={"value_dtype": "float32",
                                                                       "position_fraction": 0.25})
    precompute.run(cfg)
    return cfg


def _hashes(store_dir):
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(store_dir, "shards", "*.arrow")))}


def _examples(cfg):
    store = ts.TeacherStore(cfg.teacher.output_dir)
    return store, {store.example(i)["example_id"]: store.example(i) for i in range(len(store))}


# ---- 1. length-skewed built-in data -------------------------------------------------------------

def test_skewed_builtin_data_spans_the_document_and_length_range():
    fixed = builtin.generate("train", 200, seed=1, num_documents=3)
    assert {len(r["documents"]) for r in fixed} == {3}
    assert fixed == builtin.generate("train", 200, seed=1, num_documents=3, max_documents=None, extra_sentences=0)
    skewed = builtin.generate("train", 200, seed=1, num_documents=1, max_documents=12, extra_sentences=6)
    assert skewed == builtin.generate("train", 200, seed=1, num_documents=1, max_documents=12, extra_sentences=6)
    counts = [len(r["documents"]) for r in skewed]
    assert min(counts) == 1 and max(counts) == 12 and len(set(counts)) == 12
    chars = [sum(len(d) for d in r["documents"]) for r in skewed]
    assert max(chars) > 15 * min(chars)  # uneven: what padding wastes compute on
    for r in skewed:  # the answer is still in exactly the target's document
        assert sum(r["answer"] in d and r["entity"] in d for d in r["documents"]) >= 1
    with pytest.raises(ConfigError, match="data.builtin_max_documents=2 must be >= data.builtin_num_documents=3"):
        tiny_config("/tmp/x", data={"builtin_num_documents": 3, "builtin_max_documents": 2})


# ---- 2. packing ---------------------------------------------------------------------------------

def test_packed_logits_equal_per_example_logits(tiny_store):
    model = load_model("builtin:tiny-llama").eval()
    store, _ = _examples(tiny_store)
    rows = [store.example(i) for i in range(6)]
    lens = [len(r["input_ids"]) for r in rows]
    batch = to_device(collate(rows, 0, MaskedPacking(sum(lens), float("inf"))), "cpu")  # one row: fewest tokens
    assert batch["input_ids"].shape[0] < len(rows) and "attention_mask" not in batch  # really packed
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits
        row, t = batch["rows_b"], batch["rows_t"]
        start = 0
        for r in rows:
            alone = model(input_ids=torch.as_tensor(r["input_ids"])[None]).logits[0]
            n = len(r["positions"])
            got = packed[row[start:start + n], t[start:start + n]]
            assert torch.allclose(got, alone[torch.as_tensor(r["positions"], dtype=torch.long)], atol=1e-5)
            start += n
    # and attention does cross examples without the packed position_ids, or with a KV cache (transformers
    # then skips the packed mask): the check can fail
    with torch.no_grad():
        for crossed in (model(input_ids=batch["input_ids"], use_cache=False).logits,
                        model(**{**model_inputs(batch), "use_cache": True}).logits):
            assert not torch.allclose(crossed[row, t], packed[row, t], atol=1e-3)


def _source(kind, method, model, tiny_store, sampled_store):
    cfg = sampled_store if kind == "sampled" else tiny_store
    store = ts.TeacherStore(cfg.teacher.output_dir)
    if kind == "none":
        return PlainData(store)
    if kind in ("offline", "sampled"):
        return StoredSignal(store)
    frozen = copy.deepcopy(model).requires_grad_(False) if method == "full" else None
    return LiveModel(store, frozen)


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("kind", ["none", "offline", "online", "sampled"])
def test_a_packed_step_has_the_loss_and_gradients_of_the_padded_step(tiny_store, sampled_store, method, kind):
    """alpha = 0 (no teacher) and alpha > 0 (top-k store, sampled store, live teacher), LoRA and full."""
    from peft import get_peft_model
    tc = tiny_store.train
    model = load_model("builtin:tiny-llama").eval()
    g = torch.Generator().manual_seed(3)
    if method == "lora":
        model.requires_grad_(False)
        torch.manual_seed(0)
        model = get_peft_model(model, train.lora_config(tc)).eval()
    source = _source(kind, method, model, tiny_store, sampled_store)
    with torch.no_grad():  # move the student off the teacher, so that the KL has a gradient
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or method == "full"):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    objective = train.Objective(model, tc, source)
    params = [p for p in objective.parameters() if p.requires_grad]
    rows = [source.examples.example(i) for i in (0, 5, 9)]
    n_nll = sum(len(r["input_ids"]) - r["prompt_len"] for r in rows)
    n_kl = sum(len(r["positions"]) for r in rows)
    c_kl = 0.0 if kind == "none" else 0.5 / n_kl
    out = {}
    lens = [len(r["input_ids"]) for r in rows]
    for layout, how in (("padded", PADDED), ("packed", MaskedPacking(sum(lens), float("inf")))):  # one row
        batch = to_device(source.batch(rows, 0, how), "cpu")
        loss, nll, kl = objective(batch, 1.0 / n_nll, c_kl)
        out[layout] = (loss.detach(), nll, kl, torch.autograd.grad(loss, params), batch)
    (lp, np_, kp, gp, bp), (lu, nu, ku, gu, bu) = out["packed"], out["padded"]
    assert bp["padded_tokens"] <= bu["padded_tokens"] and "position_ids" in bp  # really packed, never worse
    assert bp["input_ids"].shape[0] == 1 and bp["padded_tokens"] == sum(lens) < bu["padded_tokens"]
    assert torch.allclose(lp, lu, atol=1e-5, rtol=1e-5) and torch.allclose(np_, nu, rtol=1e-5)
    assert torch.allclose(kp, ku, atol=1e-7 * n_kl, rtol=1e-5)  # sums over n_kl positions of fp32 values
    assert (ku.abs() > 1e-4) == (kind != "none")  # the KL term is really there
    for a, b in zip(gp, gu):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), (a - b).abs().max()
    assert any(g.abs().max() > 0 for g in gu)


@pytest.mark.parametrize("attention", ["sdpa", cpu_flash.NAME])
def test_packed_training_run_equals_the_padded_one(tmp_path, attention):
    """Through the engine on length-skewed data (SGD, so that a wrong scale would show): the same adapters
    after 3 steps, with less padding; under sdpa (packed rows, block-diagonal mask) and under a kernel with
    flash-attention's contract (one varlen row)."""
    from safetensors.torch import load_file
    skewed = {"builtin_num_documents": 1, "builtin_max_documents": 8, "builtin_extra_sentences": 3}
    store = tiny_config(str(tmp_path), data=skewed, teacher={"value_dtype": "float32"})
    precompute.run(store)
    common = {"optim": "sgd", "learning_rate": 2.0, "max_grad_norm": 1e9, "max_steps": 3, "micro_batch_size": 4}
    got = {}
    calls = cpu_flash.CALLS["varlen"]
    for packing in (False, True):
        cfg = tiny_config(str(tmp_path / str(packing)), data=skewed, model={"attn_implementation": attention},
                          teacher={"value_dtype": "float32", "output_dir": store.teacher.output_dir},
                          train={**common, "packing": packing, "pack_tokens": 1024})
        train.train(cfg)
        got[packing] = load_file(os.path.join(cfg.train.output_dir, "final", "adapter_model.safetensors"))
        rows = [json.loads(x) for x in open(os.path.join(cfg.train.output_dir, "metrics.jsonl"))]
        got[(packing, "padding")] = np.mean([r["padding"] for r in rows])
    for k in got[False]:
        assert torch.allclose(got[True][k], got[False][k], atol=1e-5, rtol=1e-4), k
    assert got[(True, "padding")] < got[(False, "padding")]
    if attention == cpu_flash.NAME:  # the packed run's every layer ran the varlen branch, with no padding
        assert cpu_flash.CALLS["varlen"] > calls and got[(True, "padding")] == 0


def _flash_student(tc):
    """The tiny model under the CPU kernel with flash-attention's contract, LoRA B moved off 0 (a KL gradient)."""
    from peft import get_peft_model
    from selfaug.config import ModelConfig
    model = load_model(ModelConfig(name_or_path="builtin:tiny-llama", attn_implementation=cpu_flash.NAME))
    model.requires_grad_(False)
    torch.manual_seed(0)
    model = get_peft_model(model, train.lora_config(tc)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


@pytest.mark.parametrize("kind", ["offline", "sampled", "online"])
def test_under_flash_attentions_contract_packing_is_one_varlen_row_with_the_padded_step(tiny_store, sampled_store,
                                                                                        kind):
    """transformers' flash-attention path separates packed examples only in a batch of one row or with varlen
    arguments. Under a CPU kernel with that contract, the layout `layout_for` picks (one row, cu_seq_lens) has the
    padded step's loss, NLL, KL and gradients; the multi-row layout that is right under sdpa is not (the check can
    fail: each row's examples attend to each other)."""
    from selfaug.models import attention_width
    from selfaug.train.batches import layout_for
    model = _flash_student(tiny_store.train)
    source = _source(kind, "lora", model, tiny_store, sampled_store)
    objective = train.Objective(model, tiny_store.train, source)
    params = [p for p in objective.parameters() if p.requires_grad]
    rows = [source.examples.example(i) for i in (0, 5, 9, 3)]
    lens = [len(r["input_ids"]) for r in rows]
    n_nll, n_kl = sum(n - r["prompt_len"] for n, r in zip(lens, rows)), sum(len(r["positions"]) for r in rows)
    varlen = layout_for(cpu_flash.NAME, True, 4096, attention_width(model.config))
    assert isinstance(varlen, VarlenPacking) and isinstance(layout_for("sdpa", True, 4096, 1e3), MaskedPacking)
    out = {}
    for name, layout in (("padded", PADDED), ("varlen", varlen), ("rows", MaskedPacking(2 * max(lens), 1e9))):
        batch = to_device(source.batch(rows, 0, layout), "cpu")
        before = dict(cpu_flash.CALLS)
        loss, nll, kl = objective(batch, 1.0 / n_nll, 0.5 / n_kl)
        out[name] = (loss.detach(), nll, kl, torch.autograd.grad(loss, params), batch, before)
    lp, np_, kp, gp, bp, before = out["varlen"]
    lu, nu, ku, gu, _, _ = out["padded"]
    assert bp["input_ids"].shape == (1, sum(lens)) and bp["cu_seq_lens_q"].tolist() == np.cumsum([0] + lens).tolist()
    forwards = 2 if kind == "online" else 1  # the live teacher (LoRA disabled) runs the same rows
    assert cpu_flash.CALLS["varlen"] - before.get("varlen", 0) == 2 * forwards  # each layer, the varlen branch
    assert torch.allclose(lp, lu, atol=1e-5, rtol=1e-5) and torch.allclose(np_, nu, rtol=1e-5)
    assert torch.allclose(kp, ku, atol=1e-7 * n_kl, rtol=1e-5) and ku.abs() > 1e-4
    for a, b in zip(gp, gu):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), (a - b).abs().max()
    lr, nr, kr, _, br, _ = out["rows"]
    assert br["input_ids"].shape[0] >= 2  # several packed rows: under this kernel, attention crosses examples
    assert abs(nr - nu) > 1e-3 * nu or abs(kr - ku) > 1e-2 * ku


def test_an_attention_name_transformers_does_not_know_is_one_line_before_the_model_loads(tmp_path, tiny_store):
    from selfaug.models import ModelError, check_attention
    check_attention(cpu_flash.NAME)  # registered by a program: accepted
    with pytest.raises(ModelError, match="model.attn_implementation='flash_attn_9' is not an attention implementation"):
        check_attention("flash_attn_9")
    with pytest.raises(ModelError, match="flash_attention_2 needs the flash-attn package"):
        check_attention("flash_attention_2")
    cfg = tiny_config(str(tmp_path), model={"attn_implementation": "sdpa2"},
                      teacher={"output_dir": tiny_store.teacher.output_dir})
    with pytest.raises(ModelError, match="'sdpa2' is not an attention implementation"):
        train.train(cfg)


def test_pack_tokens_below_the_longest_example_is_refused_before_the_model_loads(tmp_path, tiny_store):
    cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "output_dir": tiny_store.teacher.output_dir},
                      train={"packing": True, "pack_tokens": 40})
    with pytest.raises(train.TrainError, match=r"train.pack_tokens=40 is smaller than the longest example \(\d+ "):
        train.train(cfg)
    assert not os.path.exists(os.path.join(cfg.train.output_dir, "metrics.jsonl"))


# ---- 3. position sampling -----------------------------------------------------------------------

def test_a_quarter_store_holds_a_quarter_of_the_prompt_positions_with_the_full_values(tiny_store, quarter_store):
    _, full = _examples(tiny_store)
    _, quarter = _examples(quarter_store)
    assert full.keys() == quarter.keys()
    kept = total = 0
    for eid, q in quarter.items():
        P = q["prompt_len"]
        assert len(q["positions"]) == max(1, int(np.floor(0.25 * P + 0.5)))  # rounding per example
        assert len(set(q["positions"].tolist())) == len(q["positions"]) and q["positions"].max() < P
        f = full[eid]
        at = q["positions"]  # the full store holds every prompt position, at index t
        for col in ("topk_ids",):
            assert (q[col] == f[col][at]).all()
        assert np.allclose(q["topk_logprobs"], f["topk_logprobs"][at], atol=1e-5)
        assert np.allclose(q["tail_logprob"], f["tail_logprob"][at], atol=1e-4)
        kept, total = kept + len(at), total + P
    assert 0.24 < kept / total < 0.26
    manifest = ts.read_manifest(quarter_store.teacher.output_dir)
    full_bytes = ts.read_manifest(tiny_store.teacher.output_dir)["totals"]["bytes"]
    assert manifest["settings"]["position_fraction"] == 0.25 and manifest["totals"]["bytes"] < 0.35 * full_bytes


def test_positions_are_the_same_on_rerun_online_and_with_a_cap(tmp_path, quarter_store):
    again = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "position_fraction": 0.25})
    precompute.run(again)
    assert _hashes(again.teacher.output_dir) == _hashes(quarter_store.teacher.output_dir)
    # online (no store): the same positions from the same seed
    _, stored = _examples(quarter_store)
    data = DataExamples(load_examples(again.data.train, load_tokenizer("builtin:tiny-llama"), again.data),
                        ts.PositionRule.of(again.teacher))
    for i in range(len(data)):
        e = data.example(i)
        assert (e["positions"] == stored[e["example_id"]]["positions"]).all()
    assert (data.lengths().kl == np.array([len(stored[k]["positions"]) for k in sorted(stored)])).all()
    # another seed draws other positions; a cap bounds the count
    other = ts.PositionRule("prompt", 0.25, None, seed=1).positions(0, 300, 200)
    assert not np.array_equal(other, ts.PositionRule("prompt", 0.25, None, seed=0).positions(0, 300, 200))
    capped = ts.PositionRule("prompt", 0.5, 7, seed=0)
    assert len(capped.positions(0, 300, 200)) == 7 and len(capped.positions(1, 10, 4)) == 2


def test_two_ranks_write_the_same_sampled_quarter_store_as_one(tmp_path):
    """Positions and samples are drawn from (seed, example id) alone: any world size, same bytes."""
    one = tiny_config(str(tmp_path / "one"), teacher={"position_fraction": 0.25, "signal": "sampled",
                                                      "samples": SAMPLES, "shard_size": 3})
    precompute.run(one)
    two = tiny_config(str(tmp_path / "two"), teacher={"position_fraction": 0.25, "signal": "sampled",
                                                      "samples": SAMPLES, "shard_size": 3})
    out = launch("precompute", write_recipe(str(tmp_path / "two.yaml"), two), nprocs=2)
    # DeepSpeed's CPU shared-memory all-reduce op was neither loaded nor mapped (dist.skip_cpu_shm_op)
    assert "deepspeed_shm_comm" not in out.stdout + out.stderr
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{out.master_port}_*") == []
    assert _hashes(one.teacher.output_dir) == _hashes(two.teacher.output_dir) and len(_hashes(one.teacher.output_dir)) == 4


def test_training_on_a_quarter_store_normalizes_by_the_stored_positions(tmp_path, quarter_store):
    cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "position_fraction": 0.25,
                                              "output_dir": quarter_store.teacher.output_dir},
                      train={"max_steps": 2, "alpha": 0.5})
    out = train.train(cfg)
    adapter = load_file(os.path.join(out, "final", "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # it trained (lora_B starts at 0)
    store, _ = _examples(quarter_store)
    sampler = StepSampler(len(store), cfg.train.micro_batch_size, 1, 1, cfg.train.seed)
    rows = [json.loads(x) for x in open(os.path.join(cfg.train.output_dir, "metrics.jsonl"))]
    for r in rows:
        idx = sampler.global_batch(r["step"] - 1)
        assert r["kl_positions"] == sum(len(store.example(int(i))["positions"]) for i in idx)
    # a recipe with another fraction does not train on this store
    other = tiny_config(str(tmp_path / "b"), teacher={"value_dtype": "float32", "output_dir":
                                                      quarter_store.teacher.output_dir})
    with pytest.raises(ts.StoreError, match=r"position_fraction \(store: 0.25, recipe: 1.0\)"):
        train.train(other)


# ---- 4. the sampled store -----------------------------------------------------------------------

def test_sampled_store_counts_logprobs_and_frequencies(sampled_store):
    """Counts sum to N everywhere; the log-probs are the model's; and pooled over all positions, the
    sampled frequencies of each probability-rank group match the teacher's mass in it: |z| < 4.5 per
    group, z = (observed - expected) / sqrt(sum of the binomial variances) (seeded: deterministic)."""
    model = load_model("builtin:tiny-llama").eval()
    store, examples = _examples(sampled_store)
    manifest = ts.read_manifest(sampled_store.teacher.output_dir)
    assert manifest["settings"]["signal"] == "sampled" and manifest["settings"]["samples"] == SAMPLES
    groups = [(0, 1), (1, 4), (4, 16), (16, 64), (64, None)]  # ranks of p, most likely first
    observed, expected, variance = np.zeros(len(groups)), np.zeros(len(groups)), np.zeros(len(groups))
    positions = 0
    for e in examples.values():
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.as_tensor(e["input_ids"])[None]).logits[0].float(), -1)
        logp = logp[torch.as_tensor(e["positions"], dtype=torch.long)].double()  # (P, V)
        ends = np.cumsum(e["sample_len"])
        starts = ends - e["sample_len"]
        order = logp.argsort(dim=-1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(logp.shape[1]).expand_as(order))
        p_sorted = logp.exp().gather(1, order)
        for j, (a, b) in enumerate(zip(starts, ends)):
            ids = torch.as_tensor(e["sample_ids"][a:b].astype(np.int64))
            counts = e["sample_counts"][a:b].astype(np.int64)
            assert counts.sum() == SAMPLES and len(np.unique(ids)) == len(ids)
            assert torch.allclose(torch.as_tensor(e["sample_logprobs"][a:b]).double(), logp[j, ids], atol=1e-5)
            r = rank[j, ids].numpy()
            for gi, (lo, hi) in enumerate(groups):
                inside = (r >= lo) & (r < (hi if hi is not None else 1 << 30))
                observed[gi] += counts[inside].sum()
                mass = p_sorted[j, lo:hi].sum().item()
                expected[gi] += SAMPLES * mass
                variance[gi] += SAMPLES * mass * (1 - mass)
            positions += 1
    z = (observed - expected) / np.sqrt(variance)
    assert positions > 500 and np.abs(z).max() < 4.5, (observed, expected, z)
    assert len(store) == 12  # every record is stored (training on it: test_training_on_the_sampled_store)


def test_training_on_the_sampled_store(tmp_path, sampled_store, capsys):
    from selfaug.cli import main
    assert main(["inspect", sampled_store.teacher.output_dir]) == 0  # hashes, schema and values verify
    assert "sampled, N=16" in capsys.readouterr().out
    cfg = tiny_config(str(tmp_path), teacher={"value_dtype": "float32", "signal": "sampled", "samples": SAMPLES,
                                              "output_dir": sampled_store.teacher.output_dir},
                      train={"max_steps": 2})
    train.train(cfg)
    rows = [json.loads(x) for x in open(os.path.join(cfg.train.output_dir, "metrics.jsonl"))]
    assert abs(rows[0]["kl"]) < 1e-5 and rows[1]["kl"] != 0  # the student starts as the teacher


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,match", [
    ("position_fraction", 0, "teacher.position_fraction=0.0 must be > 0"),
    ("position_fraction", 1.5, "teacher.position_fraction=1.5 must be <= 1"),
    ("samples", 0, "teacher.samples=0 must be >= 1"),
    ("max_positions", 0, "teacher.max_positions=0 must be >= 1"),
])
def test_bad_sampling_settings_name_their_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config("/tmp/x", teacher={key: value})


def test_a_store_of_the_other_signal_is_refused_naming_teacher_signal(tmp_path, tiny_store, sampled_store):
    for store, signal in ((tiny_store, "sampled"), (sampled_store, "topk")):
        cfg = tiny_config(str(tmp_path / signal), teacher={"value_dtype": "float32", "signal": signal,
                                                           "samples": SAMPLES, "output_dir": store.teacher.output_dir})
        other = "topk" if signal == "sampled" else "sampled"
        with pytest.raises(ts.StoreError, match=f"holds teacher.signal={other} values, the recipe has "
                                                f"teacher.signal={signal}"):
            train.train(cfg)
    with pytest.raises(ConfigError, match="train.kl_direction=reverse needs the student's own samples"):
        tiny_config(str(tmp_path), teacher={"signal": "sampled"}, train={"kl_direction": "reverse"})


def test_poisoned_sampled_counts_are_refused(tmp_path, sampled_store):
    import pyarrow as pa
    import shutil
    poisoned = str(tmp_path / "poisoned")
    shutil.copytree(sampled_store.teacher.output_dir, poisoned)
    path = os.path.join(poisoned, "shards", "shard-00001.arrow")
    table = ts.read_shard(path)
    col = table.column("sample_counts").combine_chunks()
    inner = col.values
    values = inner.values.to_numpy().copy()
    values[2] += 1
    new = pa.ListArray.from_arrays(col.offsets, pa.ListArray.from_arrays(inner.offsets, pa.array(values)))
    table = table.set_column(table.schema.get_field_index("sample_counts"), table.schema.field("sample_counts"), new)
    problems = ts.check_shard(table, ts.read_manifest(poisoned)["settings"], "shard-00001.arrow")
    assert problems and "sample counts that do not sum to teacher.samples=16" in problems[0]


def test_the_sampled_rows_follow_their_teacher_in_a_reference_forward():
    """The sampled signal's inverse-CDF draws on a fixed distribution land where they should."""
    logp = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0, -30.0]]), -1)
    cdf = logp.exp().cumsum(-1)
    u = torch.tensor([[0.0, cdf[0, 0].item() - 1e-6, cdf[0, 0].item() + 1e-6, 0.999999]])
    out = signals.inverse_cdf_draws(logp.clone(), u)
    assert out["sample_ids"].tolist() == [[0, 0, 1, 2]]
    assert torch.allclose(out["sample_logprobs"], logp[0, [0, 0, 1, 2]][None])
    deduped = signals.dedupe_samples(out["sample_ids"].numpy(), out["sample_logprobs"].numpy())
    assert deduped["sample_ids"].tolist() == [0, 1, 2] and deduped["sample_counts"].tolist() == [2, 1, 1]
    assert deduped["sample_len"].tolist() == [3]


def test_pack_never_processes_more_than_padding_and_respects_the_cap():
    from selfaug.train.batches import pack
    rng = np.random.default_rng(0)
    for _ in range(200):
        lens = rng.integers(1, 900, size=rng.integers(1, 9)).tolist()
        cap = int(rng.integers(max(lens), 2 * sum(lens) + 1))
        row, off = pack(lens, cap)
        ends = np.asarray(off) + np.asarray(lens)
        width = ends.max()
        assert ends.max() <= cap and (row.max() + 1) * width <= len(lens) * max(lens)
        for r in set(row.tolist()):  # no overlap within a row
            spans = sorted((off[i], ends[i]) for i in range(len(lens)) if row[i] == r)
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert pack([900, 300, 200, 100], 1024)[0].max() == 1  # two rows of 1000 / 500 + ... tokens
