"""Stage 1 from Python (docs/design.md, "Stage 1"; docs/trainer.md): `selfaug.precompute_store(model, tokenizer,
dataset, output_dir, ...)` on a `datasets.Dataset` in TRL's formats writes the store `selfaug precompute` writes
for the same records, shard for shard, and `SelfAugTrainer` trains from it."""
import json

import pytest

from conftest import tiny_config


def test_the_python_store_is_the_commands_store_and_selfaug_trainer_trains_from_it(tmp_path):
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    import selfaug
    from selfaug import precompute, store
    from selfaug.hf import SelfAugTrainer
    from selfaug.models import load_model, load_tokenizer
    qa = [(f"What is {i} plus {i + 3}? Answer in words.", f"The sum is {2 * i + 3}.") for i in range(7)]
    chat = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": chat(q, a)}) + "\n" for q, a in qa))
    cfg = tiny_config(str(tmp_path), data={"train": str(tmp_path / "chat.jsonl")},
                      teacher={"output_dir": str(tmp_path / "cli")})
    precompute.run(cfg)  # what `selfaug precompute` runs
    # TRL's two formats in one dataset: conversational `messages`, and `prompt`/`completion` strings
    rows = {"messages": [chat(q, a) if i < 4 else None for i, (q, a) in enumerate(qa)],
            "prompt": [None] * 4 + [q for q, _ in qa[4:]], "completion": [None] * 4 + [a for _, a in qa[4:]]}
    model, tok = load_model("builtin:tiny-llama"), load_tokenizer("builtin:tiny-llama")
    summary = selfaug.precompute_store(model, tok, datasets.Dataset.from_dict(rows), str(tmp_path / "py"), k=8,
                                      shard_size=5, forward_tokens=2048, max_seq_len=512)
    assert summary is not None and model.training  # the caller's model keeps its mode
    cli, py = (store.read_manifest(str(tmp_path / d)) for d in ("cli", "py"))
    assert [(s["file"], s["sha256"]) for s in py["shards"]] == [(s["file"], s["sha256"]) for s in cli["shards"]]
    assert len(py["shards"]) == 2 and py["totals"] == cli["totals"]
    assert py["settings"]["model"]["content_hash"].startswith("weights:")  # named by the weights in memory
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, logging_steps=1, learning_rate=1e-2)
    trainer = SelfAugTrainer(model=model, args=args, teacher_store=str(tmp_path / "py"), alpha=0.5, processing_class=tok)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "kl" in r]
    assert len(logs) == 2 and logs[0]["kl"] < 1e-4 and all(r["nll"] > 0 for r in logs)


def test_a_record_of_neither_format_and_a_key_of_no_section_are_one_line(tmp_path):
    import selfaug
    from selfaug.errors import SelfAugError
    from selfaug.models import load_model, load_tokenizer
    model, tok = load_model("builtin:tiny-llama"), load_tokenizer("builtin:tiny-llama")
    with pytest.raises(SelfAugError, match="unknown key teacher.shardsize; did you mean teacher.shard_size"):
        selfaug.precompute_store(model, tok, [{"prompt": "a", "completion": "b"}], str(tmp_path / "s"), shardsize=8)
    with pytest.raises(SelfAugError, match="record 0: prompt and completion must be strings or lists of messages"):
        selfaug.precompute_store(model, tok, [{"prompt": 3, "completion": "b"}], str(tmp_path / "s"))
