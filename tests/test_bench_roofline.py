"""The byte counting of scripts/bench_loki_generate_full.py (the roofline beside each GPU row), on CPU."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from loki_helpers import random_basis, tiny_model

from hf_patch import patch_loki


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_loki_generate_full.py"
    spec = importlib.util.spec_from_file_location("bench_loki_generate_full", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kv_bytes_of_dense_and_loki_layers(bench):
    # dense: K and V of every key; Loki: d' dims of every key, K and V of the k kept
    assert bench.kv_bytes([None], batch=2, context=1000, kv_heads=8, head_dim=128) == 2 * 8 * 2 * 1000 * 128 * 2
    assert bench.kv_bytes([(32, 250)], 2, 1000, 8, 128) == 2 * 8 * (1000 * 32 + 2 * 250 * 128) * 2
    assert bench.kv_bytes([None, (32, 250)], 2, 1000, 8, 128) == (2 * 8 * 2 * 1000 * 128 * 2
                                                                   + 2 * 8 * (1000 * 32 + 2 * 250 * 128) * 2)
    assert bench.approx_width(32, 128) == 32 and bench.approx_width(13, 128) == 16 and bench.approx_width(9, 8) == 8


def test_layer_reads_follow_the_patch(bench):
    model = tiny_model("llama")  # 2 layers, 2 KV heads, D = 16
    assert bench.layer_reads(model, 1000, 2) == [None, None]  # unpatched: full attention
    patch_loki(model, random_basis(), d_frac=0.25, k_frac=0.25, k_rule="row", sink_tokens=0, recent_tokens=0,
               dense_layers=[0])
    assert bench.layer_reads(model, 1000, 2) == [None, (8, 250)]  # d = 4 -> an 8-wide narrow copy
    patch_loki(model, random_basis(), k_frac=1.0, sink_tokens=0, recent_tokens=0, dense_layers=0)
    assert bench.layer_reads(model, 1000, 2) == [None, None]  # k_frac = 1: every step is dense


def test_roofline_counts_weights_once_and_the_lm_head_apart(bench):
    model = tiny_model("llama")
    body, head = bench.weight_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    assert head == 97 * 64 * 4 and body == (params - 2 * 97 * 64) * 4  # fp32; input embeddings not counted
    row = bench.roofline(model, False, batch=2, context=100, bandwidth=1e9)
    kv = 2 * 2 * 2 * 2 * 100 * 16 * 4  # layers x B x H_kv x (K, V) x S x D x 4 bytes (the model's fp32)
    assert row["bytes_gb"] * 1e9 == pytest.approx(body + head + kv)
    assert row["floor_ms"] == pytest.approx((body + head + kv) / 1e9 * 1e3)


def test_largest_batch_fits_the_free_memory(bench):
    config = bench.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    need = [bench.memory_needed(config, b, 32768, 65, 4096, 32) for b in range(1, 10)]
    assert need == sorted(need) and need[0] > bench.cache_bytes(config, 1, 32768, 32)
    assert bench.largest_batch(config, 32768, 65, 4096, 32, need[7], 16) == 8
    assert bench.largest_batch(config, 32768, 65, 4096, 32, need[7] - 1, 16) == 7
    assert bench.largest_batch(config, 32768, 65, 4096, 32, need[7], 4) == 4
    assert bench.largest_batch(config, 32768, 65, 4096, 32, need[0] - 1, 8) == 0
