"""The head contract: selfaug's store, KL, NLL and drift apply the lm_head themselves, so a model's logits must be
c * lm_head(final hidden state). Granite divides by config.logits_scaling, Falcon-H1 multiplies by
lm_head_multiplier, Cohere by logit_scale: applied in every stage. Anything else is found by one probe forward and
refused in one line, as is a softcapped head."""
import numpy as np
import pytest
import torch
from transformers import Gemma2Config, GraniteConfig, LlamaForCausalLM

from conftest import tiny_config
from selfaug import precompute, store
from selfaug.models import ModelError, check_head, decoder_and_head, head_scale, load_model, tiny_llama_config

SHAPE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False)


def _random_dir(tmp, config):
    path = tmp / config.model_type
    config.save_pretrained(path)
    return str(path)


def test_a_granite_store_holds_the_models_own_log_probs(tmp_path):
    """logits_scaling 8: the stored top-k log-probs are the model's own log_softmax, not lm_head(h)'s."""
    model_dir = _random_dir(tmp_path, GraniteConfig(logits_scaling=8.0, **SHAPE))
    cfg = tiny_config(str(tmp_path), model={"name_or_path": model_dir, "init": "random", "seed": 1},
                      data={"builtin_train_size": 3}, teacher={"value_dtype": "float32"})
    precompute.run(cfg)
    teacher = store.TeacherStore(cfg.teacher.output_dir)
    model = load_model(cfg.model, torch.float32).eval()
    assert head_scale(model) == 1 / 8
    for i in range(len(teacher)):
        row = teacher.example(i)
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(np.asarray(row["input_ids"]), dtype=torch.long)[None]).logits[0]
        own = torch.log_softmax(logits.float(), -1)[torch.as_tensor(np.asarray(row["positions"]), dtype=torch.long)]
        stored = torch.as_tensor(np.asarray(row["topk_logprobs"]), dtype=torch.float32).view(own.shape[0], -1)
        ids = torch.as_tensor(np.asarray(row["topk_ids"]), dtype=torch.long).view(own.shape[0], -1)
        assert torch.allclose(stored, own.gather(1, ids), atol=1e-4), (stored - own.gather(1, ids)).abs().max()
        assert torch.equal(ids[:, 0], own.argmax(-1))


class ScaledLlama(LlamaForCausalLM):
    """A model class with a transform after its head that no config attribute names (as a trust_remote_code
    model may have)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 1.7
        return out


def test_a_model_whose_logits_are_not_its_head_is_refused_in_one_line():
    config = tiny_llama_config()
    plain = LlamaForCausalLM(config).eval()
    assert check_head(plain) == 1.0
    scaled = ScaledLlama(config).eval()
    scaled.load_state_dict(plain.state_dict())
    with pytest.raises(ModelError, match=r"ScaledLlama: its logits are not 1 \* lm_head\(final hidden state\).*"
                                         r"closest scale is 1\.7"):
        check_head(scaled)


def test_a_softcapped_head_is_refused():
    config = Gemma2Config(final_logit_softcapping=30.0, head_dim=16, **SHAPE)
    with torch.device("meta"):
        from transformers import Gemma2ForCausalLM
        model = Gemma2ForCausalLM(config)
    with pytest.raises(ModelError, match="Gemma2ForCausalLM caps its logits"):
        decoder_and_head(model)
