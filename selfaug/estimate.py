"""`selfaug estimate --config RECIPE [--gpus N] [--seq-len N --examples M]` (docs/design.md, "Command line"): before
anything runs, what a recipe will cost: the teacher store's size on disk, steps per epoch and tokens per step, and
the memory per GPU of stage 1, stage 2 (with a ZeRO-Offload config, the host memory per node too) and stage 3 for
the recipe's model shape and ZeRO stage.

The data is read and tokenized (cached, as the stages would), or, with `--seq-len N --examples M`, not read at all:
M examples of N tokens, every position a candidate of the position rule (an upper bound of the store). The model is
built on the meta device (its shape, no weights). Store bytes are the Arrow shards' (`signals.shard_bytes`: a
written shard's metadata and offsets included; a sampled store counts N unique ids per position, an upper bound).
Memory follows the memory plan of docs/distributed.md, term by term, in the dtype the recipe trains in on a GPU.
"""
from __future__ import annotations

import numpy as np

from . import store
from .config import Config, ConfigError
from .models import config_of, load_tokenizer_for, resolve_dtype

ACTIVATION_FACTOR = 1.2  # measured saved-for-backward / the per-layer formula (docs/results.md, micro-batches by tokens)
GiB = 2 ** 30
GPU_BYTES = 80 * 10 ** 9  # the GPU a plan assumes where none is visible: an 80 GB A100 / H100
FITS = 0.9  # a model fits one GPU when its weights take at most this share of it (the rest: CUDA, generation's KV)


def _shape(mc, tc) -> dict:
    """Parameter counts of the model (on the meta device: no memory) and of what trains."""
    import torch
    from transformers import AutoModelForCausalLM
    config = config_of(mc)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight
    tied = head is model.get_input_embeddings().weight
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) if hasattr(model, "model") else 0
    largest = max((p.numel() for p in model.model.layers.parameters()), default=0) if hasattr(model, "model") else 0
    small = [p.numel() for p in model.parameters() if p.numel() < 10 ** 7]  # ZeRO-3 may keep these whole
    if tc.adapter == "lora":
        targets = tc.lora_target_modules
        adapted = [m for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()
                   and ("all-linear" in targets or name.split(".")[-1] in targets)]
        matrices = [tc.lora_r * n for m in adapted for n in (m.in_features, m.out_features)]  # A and B
        small += matrices
        trainable = sum(matrices)
    else:
        trainable = params - (head.numel() if tc.freeze_lm_head and not tied else 0)
    return {"params": params, "trainable": trainable, "small": small, "layers": text.num_hidden_layers, "hidden": text.hidden_size,
            "intermediate": text.intermediate_size, "vocab": head.shape[0], "head": head.numel(),
            "head_trains": tc.adapter == "none" and not tc.freeze_lm_head, "layer": layer, "layer_largest": largest,
            "kv": getattr(text, "num_key_value_heads", text.num_attention_heads) * (
                getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)}


def _zero_plan(path: str, b: int) -> tuple[int, int, float, float]:
    """The ZeRO stage of a DeepSpeed JSON (0 without a zero_optimization section), the bytes of an accumulated
    gradient (data_types.grad_accum_dtype; DeepSpeed's default is the weights' dtype), ZeRO-3's
    stage3_param_persistence_threshold (parameters below it are kept whole on every rank; DeepSpeed's default 1e5)
    and what ZeRO-3 may keep gathered: stage3_max_live_parameters, or stage3_max_reuse_distance where larger (a
    parameter used again within it stays, whatever the live count; DeepSpeed's defaults 1e9)."""
    import json
    from . import shipped
    with open(shipped.resolve(path)) as f:
        conf = json.load(f)
    accum = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2}.get(
        str(conf.get("data_types", {}).get("grad_accum_dtype")), b)
    zero = conf.get("zero_optimization", {})
    return (int(zero.get("stage", 0)), accum, float(zero.get("stage3_param_persistence_threshold", 1e5)),
            max(float(zero.get("stage3_max_live_parameters", 1e9)), float(zero.get("stage3_max_reuse_distance", 1e9))))


def offload_plan(path: str) -> dict:
    """What a DeepSpeed JSON's ZeRO-Offload moves to the host: {"optimizer": bool, "params": bool}
    (zero_optimization.offload_optimizer / offload_param with device cpu or nvme; params only under ZeRO-3)."""
    import json
    from . import shipped
    with open(shipped.resolve(path)) as f:
        zero = json.load(f).get("zero_optimization", {})
    moved = lambda key: str(zero.get(key, {}).get("device", "none")) in ("cpu", "nvme")
    return {"optimizer": moved("offload_optimizer"), "params": moved("offload_param") and zero.get("stage") == 3}


def stage3(s: dict, b: int, gpus_per_node: int, gpu_bytes: float) -> dict:
    """Stage 3 (`selfaug eval`) per GPU: one model at a time, whole on one GPU without `eval.device_map`, spread
    by layer over the node's GPUs with it (`device_map: auto`); it fits one GPU when its weights take at most
    FITS of the GPU's memory (the rest: the CUDA context, generation's KV cache, the drift KL's logits)."""
    whole = b * s["params"]
    return {"whole": whole, "device_map": whole / max(gpus_per_node, 1), "gpu_bytes": gpu_bytes,
            "fits_one_gpu": whole <= FITS * gpu_bytes}


def stage3_problem(cfg: Config, b: int, gpu_bytes: float) -> str | None:
    """One line where the recipe evaluates a model that does not fit one GPU without `eval.device_map`, else None."""
    if cfg.eval.device_map is not None:
        return None
    e = stage3(_shape(cfg.model, cfg.train), b, 1, gpu_bytes)
    if e["fits_one_gpu"]:
        return None
    return (f"model.name_or_path={cfg.model.name_or_path}: {e['whole'] / 1e9:.1f} GB of weights do not fit one GPU "
            f"of {gpu_bytes / 1e9:.0f} GB (at most {FITS:.0%} of it), and eval.device_map is not set: set "
            "eval.device_map: auto (the model spread over the node's GPUs)")


def zero3_gathered(s: dict, max_live: float) -> float:
    """Parameters ZeRO-3 holds gathered at once: its prefetch runs ahead of the forward and the backward until
    stage3_max_live_parameters are gathered, or as many as stage3_max_reuse_distance keeps where that is larger
    (`max_live`: `_zero_plan`'s); it checks before a fetch, so one module more (the largest matrix of any layer);
    and a head's worth beside them (a trained head, fetched with the model at the step's start and again at the
    backward's; a frozen one, which the loss gathers itself with GatheredParameters); the whole model where it is
    smaller. Counted with DeepSpeed itself in tests/test_estimate.py (0.88-0.98 of this, at the 8B and 70B
    proportions, trained and frozen head)."""
    return min(s["params"], max_live + s["layer_largest"] + s["head"])


def memory(s: dict, tc, zero: int, gpus: int, tokens: int, b: int, accum: int | None = None,
           persistence: float = 1e5, max_live: float = 1e9, offload: dict | None = None) -> dict:
    """Stage 2 per GPU in bytes, term by term (b: bytes per weight, 2 in bf16; accum: per accumulated gradient,
    the shipped ZeRO configs' fp32; persistence: ZeRO-3 keeps parameters of fewer elements whole; offload:
    `offload_plan`'s, what ZeRO-Offload keeps on the host instead: `host_per_rank`, the host bytes per rank)."""
    offload = offload or {}
    shard = gpus if zero == 3 else 1
    whole = sum(n for n in s.get("small", ()) if n < persistence) if zero == 3 else 0  # LoRA's matrices, the norms
    partition = b * s["params"] / shard - b * whole / shard  # what ZeRO-Offload's offload_param moves to the host
    weights = b * s["params"] / shard + b * whole * (1 - 1 / shard)
    g = accum or b
    master = 4 if b == 2 else 0  # fp32 master weights beside bf16 ones
    states = s["trainable"] * (g / (gpus if zero >= 2 else 1) + (master + 8) / (gpus if zero >= 1 else 1))
    host = (states if offload.get("optimizer") else 0) + (partition if offload.get("params") else 0)
    states = 0 if offload.get("optimizer") else states  # the gradients' partitions, master weights and Adam
    weights = weights - partition if offload.get("params") else weights  # gathered from the host as ZeRO-3 needs
    per_token_layer = b * (7 * s["hidden"] + 2 * s["kv"] + 4 * s["intermediate"])  # docs/distributed.md
    activations = ACTIVATION_FACTOR * tokens * s["layers"] * per_token_layer
    checkpointed = tokens * s["layers"] * b * s["hidden"] + ACTIVATION_FACTOR * tokens * per_token_layer
    rows = min(tc.loss_chunk_rows, tokens)
    # a trained head's gradient: summed over the chunks in fp32 (4 bytes), rounded once into its dtype (b bytes)
    loss = rows * s["vocab"] * (b + 4 + b) + tokens * s["hidden"] * b + (s["head"] * (4 + b) if s["head_trains"] else 0)
    working = b * zero3_gathered(s, max_live) if zero == 3 else 0
    kept = weights + states + working + loss
    return {"weights": weights, "trainable_state": states, "zero3_working_set": working, "loss_buffers": loss,
            "host_per_rank": host,
            "activations": checkpointed if tc.gradient_checkpointing else activations,
            "activations_without_checkpointing": activations, "activations_with_checkpointing": checkpointed,
            "total": kept + (checkpointed if tc.gradient_checkpointing else activations)}


def _lengths(cfg: Config, seq_len: int | None, examples: int | None) -> tuple:
    """(record number, tokens, prompt tokens) of each kept example and the records read: from the tokenized data,
    or, without data, `examples` examples of `seq_len` tokens whose every position is a candidate of the rule."""
    if seq_len is None and examples is None:
        from .data import load_examples
        data = load_examples(cfg.data.train, load_tokenizer_for(cfg.model), cfg.data)
        records, tokens, prompt = data.kept_lengths()
        if len(records) == 0:
            raise store.StoreError(f"no example is kept: {data.left_out()}")
        return records, tokens, prompt, len(data)
    if not seq_len or not examples or seq_len < 1 or examples < 1:
        raise ConfigError("selfaug estimate without data needs both --seq-len N and --examples M (numbers above 0)")
    prompt = 0 if cfg.teacher.positions == "response" else seq_len  # the rule's candidates: the whole sequence
    return np.arange(examples), np.full(examples, seq_len), np.full(examples, prompt), examples


def _gpu_bytes() -> float:
    """The first visible GPU's memory, else GPU_BYTES."""
    import torch
    return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else float(GPU_BYTES)


def run(cfg: Config, gpus: int, seq_len: int | None = None, examples: int | None = None,
        gpus_per_node: int | None = None, gpu_bytes: float | None = None) -> dict:
    """The plan of `cfg` on `gpus` data-parallel ranks (`gpus_per_node` on a node, default min(gpus, 8)) of
    `gpu_bytes` each (default: the visible GPU's, else 80 GB), printed and returned; without data when `seq_len`
    and `examples` are given."""
    records, tokens, prompt, n_records = _lengths(cfg, seq_len, examples)
    gpus_per_node = gpus_per_node or min(gpus, 8)
    rule = store.PositionRule.of(cfg.teacher)
    lo, hi = rule.candidates(tokens, prompt)
    positions = rule.count(hi - lo)
    s = _shape(cfg.model, cfg.train)
    signal = store.signal_for(cfg.teacher, s["vocab"])
    size = cfg.teacher.shard_size
    chunk = records // size
    store_bytes = sum(signal.shard_bytes(int((chunk == j).sum()), int(tokens[chunk == j].sum()),
                                         int(positions[chunk == j].sum())) for j in np.unique(chunk))
    tc = cfg.train
    global_batch = tc.micro_batch_size * tc.gradient_accumulation_steps * gpus
    micro_tokens = tc.micro_batch_tokens or tc.micro_batch_size * int(tokens.max())
    b = 2 if resolve_dtype(cfg.model.dtype, "cuda").itemsize == 2 else 4
    zero, accum, persistence, max_live = _zero_plan(tc.deepspeed, b)
    offload = offload_plan(tc.deepspeed)
    mem = memory(s, tc, zero, gpus, micro_tokens, b, accum, persistence, max_live, offload)
    partitioned = cfg.teacher.deepspeed is not None
    teacher_weights = b * s["params"] / (gpus if partitioned else 1) + (b * (s["head"] + s["layer"]) if partitioned else 0)
    forward = max(cfg.teacher.forward_tokens, int(tokens.max()))  # a forward holds one example at least
    # no gradients: one layer's residual and normed input (2H) and the MLP's gate, up and their product (3I) a token
    stage1 = teacher_weights + forward * b * (2 * s["hidden"] + 3 * s["intermediate"]) + \
        cfg.teacher.vocab_chunk_rows * s["vocab"] * 4
    out = {"gpus": gpus, "gpus_per_node": gpus_per_node, "zero_stage": zero, "dtype_bytes": b,
           "examples": int(len(records)), "records": n_records, "data_read": seq_len is None, "seq_len": int(tokens.max()),
           "tokens": int(tokens.sum()), "positions": int(positions.sum()),
           "store_bytes": float(store_bytes), "store_is_upper_bound": signal.draws or seq_len is not None,
           "steps_per_epoch": int(len(records) // global_batch), "global_batch": global_batch,
           "steps": tc.total_steps(len(records), gpus),
           "tokens_per_step": float(tokens.mean() * global_batch), "micro_batch_tokens_max": micro_tokens,
           "model": s, "stage2_bytes_per_gpu": mem, "stage1_bytes_per_gpu": stage1, "offload": offload,
           "host_bytes_per_node": mem["host_per_rank"] * gpus_per_node,
           "stage3_bytes_per_gpu": stage3(s, b, gpus_per_node, gpu_bytes or _gpu_bytes())}
    print(format_estimate(out, cfg))
    return out


def _download_line(e: dict, cfg: Config) -> str:
    """What a store on object storage costs each node and rank in downloads and node-local disk."""
    mb = e["store_bytes"] / 2 ** 20
    if cfg.train.order != "shards":
        return (f"; on object storage: each node downloads all of it once, so $SELFAUG_STORE_CACHE needs {mb:,.1f} MiB "
                f"of node-local disk (per rank: {mb / e['gpus_per_node']:,.1f} MiB, its node's {e['gpus_per_node']} ranks "
                "sharing the copy; train.order=shards downloads only each rank's share)")
    from .store.cache import RankShards
    shards = max(-(-e["examples"] // cfg.teacher.shard_size), 1)
    shard_mb, epochs = mb / shards, e["steps"] / max(e["steps_per_epoch"], 1)
    ahead = RankShards.ahead()
    share = mb / e["gpus"] + 2 * shard_mb  # its part, and at most a shard at each end shared with the rank beside it
    held = -(-cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps // cfg.teacher.shard_size) + 1 + ahead
    return (f"; on object storage by shards ({shards} shards of about {shard_mb:,.1f} MiB): each rank downloads its "
            f"share, at most {share:,.1f} MiB per epoch ({share * epochs:,.1f} MiB over the run's "
            f"{epochs:.2f} epochs), and holds at most {held} shards at once (a step's, and {ahead} ahead): "
            f"$SELFAUG_STORE_CACHE needs {held * shard_mb:,.1f} MiB of node-local disk per rank, "
            f"{held * shard_mb * e['gpus_per_node']:,.1f} MiB per node of {e['gpus_per_node']} ranks")


def format_estimate(e: dict, cfg: Config) -> str:
    s, m = e["model"], e["stage2_bytes_per_gpu"]
    mb = e["store_bytes"] / 2 ** 20
    lines = [f"data: {e['examples']} examples kept of {e['records']} records, {e['tokens']:,} tokens, "
             f"{e['positions']:,} KL positions" if e["data_read"] else
             f"data: not read; {e['examples']} examples of {e['seq_len']:,} "
             f"tokens (--examples, --seq-len), {e['tokens']:,} tokens, at most {e['positions']:,} KL positions",
             f"teacher store: {mb:,.1f} MiB on disk ({'at most; ' if e['store_is_upper_bound'] else ''}"
             f"{e['store_bytes'] / max(e['positions'], 1):.1f} bytes per position, uncompressed)"
             + (_download_line(e, cfg) if store.is_url(cfg.teacher.output_dir) else ""),
             f"steps: {e['steps_per_epoch']} per epoch at a global batch of {e['global_batch']} "
             f"({cfg.train.micro_batch_size} x {cfg.train.gradient_accumulation_steps} x {e['gpus']} GPUs); "
             f"{e['tokens_per_step']:,.0f} tokens per step on average; the run is {e['steps']} steps, "
             f"{e['steps'] / max(e['steps_per_epoch'], 1):.2f} epochs",
             f"model: {s['params'] / 1e9:.2f}B parameters ({s['trainable'] / 1e6:,.2f}M trained), {s['layers']} layers, "
             f"hidden {s['hidden']}, vocabulary {s['vocab']}; ZeRO stage {max(e['zero_stage'], 0)}, "
             f"{'bf16' if e['dtype_bytes'] == 2 else 'fp32'} on a GPU",
             f"memory per GPU, stage 2 (micro-batches of up to {e['micro_batch_tokens_max']:,} tokens):"]
    for key in ("weights", "trainable_state", "zero3_working_set", "loss_buffers", "activations_with_checkpointing",
                "activations_without_checkpointing"):
        lines.append(f"  {key.replace('_', ' '):<36}{m[key] / GiB:>9.2f} GiB")
    lines.append(f"  {'total (' + ('with' if cfg.train.gradient_checkpointing else 'without') + ' checkpointing)':<36}"
                 f"{m['total'] / GiB:>9.2f} GiB  (+ the CUDA context and allocator slack, about 2 GiB)")
    if any(e["offload"].values()):
        moved = " and ".join(k for k, v in (("the optimizer state", e["offload"]["optimizer"]),
                                            ("the parameters", e["offload"]["params"])) if v)
        lines.append(f"  {'host memory per node, ' + str(e['gpus_per_node']) + ' ranks':<36}"
                     f"{e['host_bytes_per_node'] / GiB:>9.2f} GiB  (ZeRO-Offload: {moved} on the host, pinned)")
    lines.append(f"memory per GPU, stage 1 ({'partitioned' if cfg.teacher.deepspeed else 'whole'} teacher): "
                 f"{e['stage1_bytes_per_gpu'] / GiB:.2f} GiB")
    t = e["stage3_bytes_per_gpu"]
    where = "eval.device_map: " + (cfg.eval.device_map or "null")
    lines.append(f"memory per GPU, stage 3 (one model at a time; {where}): {t['whole'] / GiB:.2f} GiB whole on one GPU, "
                 f"{t['device_map'] / GiB:.2f} GiB with eval.device_map: auto over {e['gpus_per_node']} GPUs")
    if not t["fits_one_gpu"] and cfg.eval.device_map is None:
        lines.append(f"  the model does not fit one GPU of {t['gpu_bytes'] / 1e9:.0f} GB: set eval.device_map: auto")
    return "\n".join(lines)
