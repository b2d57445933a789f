"""Stage 1 (docs/design.md, "Stage 1"): run the frozen model once over the training data and compute,
at every KL position the position rule keeps (`store.PositionRule`), the teacher's signal (`teacher.signal`:
the top-k log-probabilities and the log of the remaining mass, or N draws from the full distribution).
What a signal computes from the full-vocabulary log-probs is its own (`store.signals`); this module runs
the model, hands each chunk of log-probs to the signal and the rows to `store.StoreWriter`.

Work is cut into fixed chunks of `teacher.shard_size` source records, one shard each, whose content depends
only on the chunk's index; the chunks still to compute are dealt round-robin over the ranks
(`StoreWriter.open`), so a store can be resumed with any number of ranks, each rank gets its share of what
is left, and the store comes out identical. The ranks run their chunks independently and meet at the end
(`writer.close`): a rank done first waits there, up to train.ddp_timeout.

The teacher is either whole on every rank (`teacher.deepspeed: null`) or partitioned over all ranks
with ZeRO-3 (`teacher.deepspeed: ds_configs/zero3_inference.json`): parameters are gathered layer by
layer in each forward, so the ranks step in lockstep, and a rank with no work left runs a dummy batch
so that every rank issues the same collectives.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import dist
from . import store
from .config import Config, check_paths
from .data import DataError, pad
from .models import ModelError, check_head, decoder_and_head, head_scale, load_all, partition_line, vocab_size


@torch.no_grad()
def teacher_signal(model, input_ids, attention_mask, rows_b, rows_t, signal_fn, chunk_rows: int) -> dict:
    """The teacher's signal at the given (batch, position) rows, from the model's own forward.

    The forward is the model's (its head on one position, `logits_to_keep=1`): the body's output is kept by a
    hook, and the signal is computed in a pre-hook of the lm_head, when the head is there to use. Under ZeRO-3
    that is inside the forward DeepSpeed traces, so its coordinator completes the trace and prefetches the
    layers (the body called on its own never completed it: every gather synchronous), and gathers the head
    once. A model spread over GPUs (eval.device_map) runs as it would for generation.

    Args:
        model: a causal LM (whole, ZeRO-3 partitioned, or dispatched over devices).
        input_ids, attention_mask: (B, T).
        rows_b, rows_t: (N,) the rows' batch index and position.
        signal_fn(logp (n, V) fp32 log-probs of a chunk, rows slice) -> {name: (n, ...) tensor}.
    Returns {name: (N, ...) tensor} on the CPU. The lm_head runs only on the N rows, `chunk_rows` at a
    time, so no (N, V) fp32 tensor is ever whole; the hidden states are scaled by `head_scale` (Granite, ...)."""
    body, head = decoder_and_head(model)
    scale, seen = head_scale(model), {}

    def keep_hidden(module, args, output):
        seen["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def signal_at_head(module, args):  # the head's parameters are in place here (ZeRO-3: its own pre-hook ran)
        hidden = seen.pop("hidden")  # (B, T, H)
        # a model spread over GPUs ends on its last layer's device, the head may sit on another
        h = hidden[rows_b.to(hidden.device), rows_t.to(hidden.device)].to(head.weight.device)  # (N, H)
        if scale != 1.0:
            h = h * scale
        parts = []
        for start in range(0, max(h.shape[0], 1), chunk_rows):
            rows = slice(start, start + chunk_rows)
            logp = F.linear(h[rows], head.weight, head.bias).float()  # (n, V), one buffer
            logp.sub_(logp.logsumexp(dim=-1, keepdim=True))  # log_softmax over the full vocabulary, in place
            parts.append(signal_fn(logp, rows))
        seen["signal"] = {name: torch.cat([p[name] for p in parts]).cpu() for name in parts[0]}

    if not _keeps_logits(model):  # its forward would make (B, T, V) logits: the body alone, the head gathered here
        import contextlib
        keep_hidden(body, (), body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))
        partitioned = [p for p in (head.weight, head.bias) if p is not None and hasattr(p, "ds_id")]
        if partitioned:
            import deepspeed
        with deepspeed.zero.GatheredParameters(partitioned) if partitioned else contextlib.nullcontext():
            signal_at_head(head, ())
        return seen["signal"]
    hooks = [body.register_forward_hook(keep_hidden), head.register_forward_pre_hook(signal_at_head)]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    if "signal" not in seen:
        raise ModelError(f"{type(model).__name__}: its forward never called its lm_head module, where stage 1 takes "
                         "the teacher's signal; this model is not supported")
    return seen["signal"]


def _keeps_logits(model) -> bool:
    """Whether the model's forward can apply its own head to the last position alone (`logits_to_keep`)."""
    import inspect
    forward = (model.get_base_model() if hasattr(model, "get_base_model") else model).forward
    return "logits_to_keep" in inspect.signature(forward).parameters


def length_batches(examples: list, batch_tokens: int) -> list[list]:
    """Longest first, as many per batch as fit in batch_tokens padded tokens (at least one)."""
    order = sorted(examples, key=lambda e: -len(e.input_ids))
    batches, cur = [], []
    for ex in order:
        longest = len(cur[0].input_ids) if cur else len(ex.input_ids)
        if cur and (len(cur) + 1) * longest > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(ex)
    if cur:
        batches.append(cur)
    return batches


class Teacher:
    """The frozen model of stage 1, whole on this rank or ZeRO-3 partitioned over all ranks, computing the
    store's signal (`store.signal_for`) at the positions the rule keeps."""

    def __init__(self, model, cfg: Config, pad_id: int, device, partitioned: bool):
        self.model = model
        self.head = decoder_and_head(model)[1]
        self.pad_id, self.device, self.partitioned = pad_id, device, partitioned
        self.vocab = vocab_size(model)
        self.rule = store.PositionRule.of(cfg.teacher)
        self.signal = store.signal_for(cfg.teacher, self.vocab)
        self.forward_tokens, self.chunk_rows = cfg.teacher.forward_tokens, cfg.teacher.vocab_chunk_rows

    def batch(self, batch: list) -> dict:
        """example_id -> (positions, the signal's arrays) for one length bucket."""
        ids, mask = pad([e.input_ids for e in batch], self.pad_id)
        pos = [self.rule.positions(e.example_id, len(e.input_ids), e.prompt_len) for e in batch]
        rb = torch.from_numpy(np.concatenate([np.full(len(p), b) for b, p in enumerate(pos)])).to(self.device)
        rt = torch.from_numpy(np.concatenate(pos).astype(np.int64)).to(self.device)
        fn = self.signal.row_fn(batch, pos, self.head.weight.device)  # the chunks' log-probs live with the head
        got = {k: v.numpy() for k, v in teacher_signal(self.model, ids.to(self.device), mask.to(self.device), rb, rt,
                                                       fn, self.chunk_rows).items()}
        out, start = {}, 0
        for e, p in zip(batch, pos):
            out[e.example_id] = (p, self.signal.per_example({k: v[start:start + len(p)] for k, v in got.items()}))
            start += len(p)
        return out

    def dummy(self) -> None:
        """The collectives of one batch with no data (partitioned teacher, a rank with no work left)."""
        one = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        teacher_signal(self.model, one, torch.ones_like(one), one[0] * 0, one[0] * 0,
                       lambda logp, rows: {"max": logp.max(-1).values}, self.chunk_rows)

    def shard(self, examples: list, out: dict) -> store.ShardRows:
        """The computed rows of one chunk, in example order, as the store's arrays."""
        order = sorted(out)
        by_id = {e.example_id: e for e in examples}
        return store.ShardRows(
            example_id=np.array(order, dtype=np.int64),
            input_ids=[by_id[i].input_ids for i in order],
            prompt_len=np.array([by_id[i].prompt_len for i in order], dtype=np.int32),
            positions=[out[i][0] for i in order],
            signal=self.signal.concat([out[i][1] for i in order]),
        )

    def compute_shard(self, examples: list) -> store.ShardRows:
        out = {}
        for batch in length_batches(examples, self.forward_tokens):
            out.update(self.batch(batch))
        return self.shard(examples, out)


def teacher_ds_config(cfg: Config, device) -> dict | None:
    """The filled ZeRO-3 inference config of `teacher.deepspeed`, or None (a whole teacher per rank)."""
    if cfg.teacher.deepspeed is None:
        return None
    from .models import resolve_dtype
    dtype = resolve_dtype(cfg.model.dtype, device)  # zero.Init builds the teacher in the dtype its section enables
    conf = dist.deepspeed_config(cfg.teacher.deepspeed, {
        "bf16.enabled": dtype == torch.bfloat16, "fp16.enabled": dtype == torch.float16,
        "train_micro_batch_size_per_gpu": 1})
    if conf.get("zero_optimization", {}).get("stage") != 3:
        raise dist.DistError(f"teacher.deepspeed={cfg.teacher.deepspeed}: a partitioned teacher needs ZeRO stage 3 "
                             "(zero_optimization.stage = 3), e.g. ds_configs/zero3_inference.json")
    for section, wanted in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if bool(conf.get(section, {}).get("enabled")) != (dtype == wanted):
            raise dist.DistError(f"teacher.deepspeed={cfg.teacher.deepspeed}: model.dtype={cfg.model.dtype} is {dtype} on "
                                 f"{device.type}, but the config's {section} section says enabled="
                                 f"{conf.get(section, {}).get('enabled', False)}: zero.Init builds the teacher in the "
                                 f"dtype the config enables; set \"{section}\": {{\"enabled\": \"auto\"}}")
    return conf


def run(cfg: Config) -> dict | None:
    check_paths(cfg)
    rank, world = dist.init(cfg.train.ddp_timeout)
    url = cfg.teacher.output_dir if store.is_url(cfg.teacher.output_dir) else None
    # a precompute already writing this store: one line now, not after loading the model (on object storage the
    # lease object is taken here, and held to the end)
    lease = store.Lease(url) if url else None
    dist.decide(lease.acquire if lease else store.StoreLock(cfg.teacher.output_dir).check_free)
    try:
        return _run(cfg, rank, world, url)
    finally:
        if lease is not None and rank == 0:
            lease.release()


def _run(cfg: Config, rank: int, world: int, url: str | None) -> dict | None:
    device = dist.device()
    teacher_cfg = cfg.teacher
    ds_conf = teacher_ds_config(cfg, device)
    if ds_conf is not None:
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=dist.timeout(cfg))
        ds_conf["train_batch_size"] = world
    loaded = load_all(cfg, device, ds_config=ds_conf)  # created partitioned under ZeRO-3
    model = loaded.model
    line = partition_line(model, rank)
    if line:
        print(line, flush=True)
    if ds_conf is not None:
        model = deepspeed.initialize(model=model, config=ds_conf)[0].module  # ZeRO-Inference: no optimizer
        check_head(model)  # the head contract, the forward gathering as the stage's will
    else:
        model.to(device)
    model.eval().requires_grad_(False)
    teacher = Teacher(model, cfg, loaded.tok.pad_token_id, device, partitioned=ds_conf is not None)
    teacher.signal.check_vocab(teacher.vocab)
    settings = store.store_settings(cfg, loaded.tok, teacher.vocab, loaded.dtype, loaded.examples.fingerprint)
    how = {"teacher": "zero3-partitioned" if ds_conf is not None else "whole", "world_size": world,
           "deepspeed": teacher_cfg.deepspeed}
    # on object storage: this node's mirror, brought up to date from the bucket (a resume keeps what is there)
    out = store.pull(url) if url else teacher_cfg.output_dir
    with store.StoreWriter(out, settings, how, overwrite=teacher_cfg.overwrite, config=cfg.to_dict(),
                           publish=url) as writer:
        return _compute(writer, teacher, loaded.examples, cfg, rank, world)


def _compute(writer: store.StoreWriter, teacher: Teacher, data, cfg: Config, rank: int, world: int) -> dict | None:
    """Every chunk this rank still has to compute, handed to the writer; the summary (rank 0)."""
    size = cfg.teacher.shard_size
    n_records = len(data)
    todo_all = writer.open((n_records + size - 1) // size)  # the same lists on every rank
    todo = todo_all[rank]
    # a partitioned teacher steps in lockstep: as many rounds as the busiest rank has chunks
    rounds = max(len(t) for t in todo_all) if teacher.partitioned else len(todo)
    records = sum(min(size, n_records - j * size) for j in todo)
    t0 = time.time()
    # closed on the way out, also by an error, so that the error starts on a line of its own
    with tqdm(total=records, unit="ex", desc=f"precompute (rank 0 of {world})", disable=rank != 0) as bar:
        for r in range(rounds):
            j = todo[r] if r < len(todo) else None
            lo, hi = (j * size, min(n_records, (j + 1) * size)) if j is not None else (0, 0)
            examples, long_stats = data.examples(lo, hi) if j is not None else ([], None)
            batches = length_batches(examples, teacher.forward_tokens)
            n = int(dist.all_reduce_max(len(batches))) if teacher.partitioned else len(batches)
            out = {}
            for b in range(n):
                if b < len(batches):
                    out.update(teacher.batch(batches[b]))
                else:
                    teacher.dummy()
            if j is None:
                continue
            rows = teacher.shard(examples, out)
            entry = writer.write(j, rows, lo, hi - lo, long_stats.to_dict())
            bar.update(hi - lo)
            el = max(time.time() - t0, 1e-9)
            bar.set_postfix(ex_s=f"{bar.n / el:.1f}", tok_s=f"{writer.computed[2] / el:.0f}", shard=entry["file"])
    return writer.close(time.time() - t0)


def precompute_store(model, tokenizer, dataset, output_dir: str, **options) -> dict | None:
    """Stage 1 from Python (`selfaug.precompute_store`): the store `selfaug precompute` writes, from a model and a
    tokenizer in memory and a `datasets.Dataset` (or a list of dicts) in TRL's formats: `messages`, or
    `prompt`/`completion` (strings, or lists of messages); records of selfaug's RAG formats pass as they are.

    `model` is the teacher as it is (not reloaded: its device and dtype are used, its mode kept); `tokenizer` must
    have a chat template. `options` are keys of the recipe's `teacher` and `data` sections (k, signal, positions,
    shard_size, forward_tokens, overwrite, ...; max_seq_len, long_policy, system_prompt, ...), checked as a recipe's.
    The records are written once as JSONL under $SELFAUG_CACHE/records/ (named by their sha256), the source the
    store names. Returns the summary (rank 0), as `run` does."""
    import hashlib
    import json
    import os
    from .config import build_config, section_fields
    from .data import cache_dir, load_examples
    from .durable import write_atomic
    lines = "".join(json.dumps(trl_record(dict(row), i), ensure_ascii=False) + "\n" for i, row in enumerate(dataset))
    path = os.path.join(cache_dir(), "records", hashlib.sha256(lines.encode()).hexdigest()[:32] + ".jsonl")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, lines)
    dtype = next(model.parameters()).dtype
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    data_keys = section_fields()["data"][1]
    sections = {"model": {"name_or_path": name, "dtype": str(dtype).replace("torch.", "")},
                "data": {"train": path}, "teacher": {"output_dir": output_dir}}
    for key, value in options.items():
        sections["data" if key in data_keys else "teacher"][key] = value
    cfg = build_config(sections)
    rank, world = dist.init(cfg.train.ddp_timeout)
    dist.decide(store.StoreLock(cfg.teacher.output_dir).check_free)
    if tokenizer.pad_token_id is None:
        raise DataError("the tokenizer has no pad token: set tokenizer.pad_token = tokenizer.eos_token")
    examples = load_examples(path, tokenizer, cfg.data)
    check_head(model)
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        teacher = Teacher(model, cfg, tokenizer.pad_token_id, device, partitioned=False)
        teacher.signal.check_vocab(teacher.vocab)
        settings = store.store_settings(cfg, tokenizer, teacher.vocab, dtype, examples.fingerprint,
                                        _fingerprint_in_memory(model, name))
        how = {"teacher": "in-memory", "world_size": world, "deepspeed": None}
        with store.StoreWriter(cfg.teacher.output_dir, settings, how, overwrite=cfg.teacher.overwrite,
                               config=cfg.to_dict()) as writer:
            return _compute(writer, teacher, examples, cfg, rank, world)
    finally:
        model.train(training)


def _fingerprint_in_memory(model, name: str) -> dict:
    """A model loaded from a local directory is named by that directory's files, as `selfaug precompute` names it;
    any other (a Hub model, one built in memory) by the sha256 of its parameters as they are."""
    import hashlib
    import os
    from .config import ModelConfig
    from .models import model_fingerprint
    if os.path.isdir(name):
        return model_fingerprint(ModelConfig(name_or_path=name))
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"name_or_path": name, "revision": None, "content_hash": "weights:" + h.hexdigest()}


def trl_record(row: dict, index: int) -> dict:
    """A record of TRL's prompt-completion format as a `messages` record (a string prompt is the user's turn, a
    string completion the assistant's); any other record as it is, without Arrow's None for absent columns."""
    row = {k: v for k, v in row.items() if v is not None}
    if "prompt" not in row or "completion" not in row:
        return row
    turn = lambda value, role: [{"role": role, "content": value}] if isinstance(value, str) else value
    prompt, completion = turn(row.pop("prompt"), "user"), turn(row.pop("completion"), "assistant")
    if not isinstance(prompt, list) or not isinstance(completion, list):
        raise DataError(f"record {index}: prompt and completion must be strings or lists of messages")
    return {**row, "messages": [{k: v for k, v in m.items() if v is not None} for m in prompt + completion]}
