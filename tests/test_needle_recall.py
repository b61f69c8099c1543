"""scripts/needle_recall.py against the library: its captured queries and keys, its selections (d = D gives the exact
top-k; one layer's selection is the one Loki's PyTorch path makes), its Loki answers and its needle positions."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from hf_patch import decode_rows, patch_loki, unpatch
from hf_patch.kernels.loki import prefill_naive
from hf_patch.loki.budget import Budget
from loki_helpers import TEXTS, byte_level_tokenizer, random_basis, tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "needle_recall.py"
_spec = importlib.util.spec_from_file_location("needle_recall", SCRIPT)
nr = sys.modules["needle_recall"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(nr)

S0, NEW = 150, 6
BASE = Budget(0.25, "paper", sink_tokens=2, recent_tokens=4)  # protected keys small enough for a short context
LOKI = dict(d_frac=0.5, k_frac=0.25, k_rule="paper", sink_tokens=2, recent_tokens=4, dense_layers=0)


@pytest.fixture(scope="module")
def run():
    """A tiny model's greedy full-attention answer to a random context, with what the script captured."""
    model = tiny_model()
    ids = torch.randint(3, 97, (S0,), generator=torch.Generator().manual_seed(1))
    tokens, queries, keys, prefill_kv = nr.full_answer(model, ids, NEW)
    return model, ids, tokens, queries, keys, prefill_kv


def test_full_answer_is_greedy_generation_and_captures_the_keys(run):
    model, ids, tokens, queries, keys, prefill_kv = run
    with torch.no_grad():
        ref = model.generate(ids[None], max_new_tokens=NEW, do_sample=False)
    assert tokens == ref[0, S0:].tolist()
    assert queries.shape == (NEW, 2, 4, 16) and keys.shape == (2, 2, S0 + NEW - 1, 16)
    for layer, (k, _) in enumerate(prefill_kv):
        torch.testing.assert_close(keys[layer, :, :S0], k[0], rtol=0, atol=0)


def test_full_dims_select_the_exact_top_k(run):
    _, _, _, queries, keys, _ = run
    n = torch.arange(S0 + 1, S0 + NEW)  # decode rows 1..NEW-1
    basis = random_basis()
    for layer in range(2):
        q, k = queries[1:, layer], keys[layer]
        rotated = nr.rotate(q, k, {"pre": basis.components[layer]})
        exact = nr.select(nr.Setting(None, "kf0.25"), q, k, n, rotated, BASE)
        assert torch.equal(nr.select(nr.Setting(1.0, "kf0.25"), q, k, n, rotated, BASE), exact)
        assert int(exact[0, 0, 0, 0].sum()) == int(BASE.tokens(n[:1]))  # the budget's k keys, protected ones in
        approx = nr.select(nr.Setting(0.25, "kf0.25"), q, k, n, rotated, BASE)
        assert not torch.equal(approx, exact)  # 4 of 16 dims of a random basis do miss keys
        # re-ranking 5 k >= n candidates (every visible key) exactly is the exact top-k again
        assert torch.equal(nr.select(nr.Setting(0.25, "kf0.25", rerank=5), q, k, n, rotated, BASE), exact)


def test_selection_is_what_the_loki_path_selects(run, monkeypatch):
    """Layer 0 (its queries and keys do not depend on attention): the script's Loki selection on the decode rows of
    the full-attention answer equals the one `selection_mask` makes inside the patched model (mode "decode",
    teacher-forced under `decode_rows`, the rows after the prompt as decode steps)."""
    model, ids, tokens, queries, keys, _ = run
    basis = random_basis()
    recorded = []
    selection_mask = prefill_naive.selection_mask  # what the PyTorch path selects with
    monkeypatch.setattr(prefill_naive, "selection_mask", lambda *a: recorded.append(selection_mask(*a)) or recorded[-1])
    patch_loki(model, basis, **LOKI)
    try:
        with torch.no_grad(), decode_rows(model, S0):
            model(torch.cat([ids, torch.tensor(tokens[:-1])])[None])
    finally:
        unpatch(model)
    library = recorded[0]  # layer 0: [1, H_kv, G, rows S0.., S]
    n = torch.arange(S0 + 1, S0 + NEW)
    q, k = queries[1:, 0], keys[0]
    mine = nr.select(nr.Setting(LOKI["d_frac"], "kf0.25"), q, k, n, nr.rotate(q, k, {"pre": basis.components[0]}),
                     BASE)
    assert library.shape == mine.shape == (1, 2, 2, NEW - 1, S0 + NEW - 1)
    assert torch.equal(library, mine)


def test_loki_answer_is_what_generate_gives(run):
    model, ids, tokens, _, _, prefill_kv = run
    basis = random_basis()
    mine = nr.loki_answer(model, basis, prefill_kv, tokens[0], NEW, **LOKI)
    patch_loki(model, basis, **LOKI)
    try:
        with torch.no_grad():
            ref = model.generate(ids[None], max_new_tokens=NEW, do_sample=False)
    finally:
        unpatch(model)
    assert mine == ref[0, S0:].tolist()
    assert mine != tokens  # Loki at this budget does change this random model's answer


def test_needle_tokens_cover_the_answer():
    tok = byte_level_tokenizer(TEXTS + ["The magic number is 4718093. Remember 4718093 well."], 300)
    text = TEXTS[0] + " One of the special magic numbers is: 4718093. " + TEXTS[1]
    ids = tok(text)["input_ids"]
    found = nr.find_tokens(tok, ids, ["4718093"])
    assert found == list(range(found[0], found[-1] + 1))
    assert "4718093" in tok.decode([ids[i] for i in found])
    assert "4718093" not in tok.decode([ids[i] for i in found[1:]] ) + tok.decode([ids[i] for i in found[:-1]])
    assert nr.find_tokens(tok, ids, ["9999999"]) == []
