"""Where Loki loses the needle: per layer and query head, while the answer of a RULER passkey request is generated,
the exact attention mass on the needle's tokens and whether they sit in the exact top-k and in Loki's approximate
top-k, at the default budget and across d (principal dims) and k (keys kept).

For each request: full-attention prefill of the context and greedy full-attention decoding (the answer the model
gives with full attention), capturing the post-RoPE query of every decode row and the keys of every layer through
Transformers' `AttentionInterface`. The rows that generate the answer's tokens are analysed (row j generates token j;
row 0 is the prefill's last row, exact in mode "decode": only rows >= 1 run Loki there, and only they are counted).
The needle is the answer's characters inside the context, mapped to token positions. For every sparse selection the
script calls the library's own `selection_mask` (Loki's PyTorch path) with the library's `Budget`: exact scores give
the exact top-k, scores on the first d dims of the PCA basis give Loki's (`gqa_select` "query"). Re-ranking keeps
the exact top-k of Loki's top-(c*k). The same prefill then decodes with the patched model (default settings, mode
"decode": a `LokiCache` filled with the prefill's keys and values, Loki's decode path for each token), which says
whether the default answers right.

Read cost per decode step (SPEC.md, key + value bytes of a sparse layer): d/2 + k (fractions); re-ranking c*k
candidates reads their full keys and the values of the k kept: d/2 + c*k/2 + k/2.

    python scripts/needle_recall.py --payload .gpu/ruler/payload.npz.xz --docs .gpu/ruler/docs.json.xz \
        --basis outputs/smollm2/basis-pre --length 4096 --limit 20 --out outputs/needle_recall.json
    python scripts/needle_recall.py --synthetic 1024 --limit 2 --basis ... --out /tmp/n.json   # prose haystack

The torch thread count is set by --threads (default 1).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import lzma
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from hf_patch import LokiCache, PCABasis, patch_loki, unpatch
from hf_patch.generation import CACHE_KWARG
from hf_patch.kernels.loki.prefill_naive import selection_mask
from hf_patch.loki.budget import Budget, num_dims
from hf_patch.loki.patch import dense_layer_set
from hf_patch.loki.settings import LokiSettings

CAPTURE_NAME = "hf_patch_needle_capture"
DEFAULT = LokiSettings()
D_FRACS = (0.125, 0.25, 0.5, 1.0)
K_SETTINGS = ("kf0.1", "kf0.2", "kf0.4", "t256", "t512", "t1024", "t2048")  # k_frac (paper rule) or a token count
RERANK = (("kf0.1", 3), ("kf0.2", 2), ("kf0.2", 4))  # (k, c): exact top-k of Loki's top-(c*k) at the default d
RETRIEVAL_MASS = 0.1  # a head whose mean needle mass over the answer rows exceeds this is a retrieval head


# ------------------------------------------------------------------------------------------------------------------
# capture: post-RoPE queries and keys through AttentionInterface
# ------------------------------------------------------------------------------------------------------------------

class Capture:
    """Per layer: the last row's post-RoPE query of each forward [H_q, D] and the latest keys [H_kv, S, D]."""

    def __init__(self) -> None:
        self.queries: dict[int, list[torch.Tensor]] = {}
        self.keys: dict[int, torch.Tensor] = {}

    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        self.queries.setdefault(layer, []).append(query[0, :, -1].detach().clone())
        self.keys[layer] = key[0].detach()

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [steps, L, H_q, D] and keys [L, H_kv, S, D]."""
        layers = sorted(self.queries)
        return (torch.stack([torch.stack(self.queries[i]) for i in layers], 1),
                torch.stack([self.keys[i] for i in layers]))


_ACTIVE: list[Capture] = []


def _capture_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA attention that records query [B, H_q, T, D] and key [B, H_kv, S, D] of batch row 0 first."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _ACTIVE:
        _ACTIVE[-1].record(module.layer_idx, query, key)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


@contextlib.contextmanager
def capturing(model: nn.Module) -> Iterator[Capture]:
    """Run `model` with full (SDPA) attention that records each layer's post-RoPE queries and keys."""
    AttentionInterface.register(CAPTURE_NAME, _capture_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    capture = Capture()
    model.set_attn_implementation(CAPTURE_NAME)
    _ACTIVE.append(capture)
    try:
        yield capture
    finally:
        _ACTIVE.pop()
        model.set_attn_implementation(previous)


def _step(model: nn.Module, token: int, cache) -> tuple[int, Any]:
    out = model(torch.tensor([[token]]), **{CACHE_KWARG: cache}, use_cache=True)
    return int(out.logits[0, -1].argmax()), getattr(out, CACHE_KWARG)


@torch.no_grad()
def full_answer(model: nn.Module, ids: torch.Tensor, max_new: int):
    """Greedy full-attention answer of context `ids` [S0]: (tokens [max_new], queries [max_new, L, H_q, D] of the
    rows that generated them, keys [L, H_kv, S0 + max_new - 1, D], prefill keys/values per layer)."""
    with capturing(model) as cap:
        out = model(ids[None], use_cache=True, logits_to_keep=1)
        cache = getattr(out, CACHE_KWARG)
        prefill_kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(max_new - 1):
            token, cache = _step(model, tokens[-1], cache)
            tokens.append(token)
    queries, keys = cap.stacked()
    return tokens, queries, keys, prefill_kv


@torch.no_grad()
def loki_answer(model: nn.Module, basis: PCABasis, prefill_kv: list, first: int, max_new: int,
                **settings) -> list[int]:
    """Greedy answer of the patched model (mode "decode") from the same exact prefill: a `LokiCache` takes the
    prefill's keys and values, then each token runs Loki's decode path. `first`: the prefill's greedy token."""
    patch_loki(model, basis, **settings)
    try:
        cache = LokiCache(model)
        for i, (k, v) in enumerate(prefill_kv):
            cache.update(k, v, i)
        tokens = [first]
        for _ in range(max_new - 1):
            token, cache = _step(model, tokens[-1], cache)
            tokens.append(token)
    finally:
        unpatch(model)
    return tokens


# ------------------------------------------------------------------------------------------------------------------
# needle positions
# ------------------------------------------------------------------------------------------------------------------

def char_spans(tok, ids: list[int]) -> tuple[str, list[int]]:
    """The text of `ids` token by token, and the index of the token each character came from."""
    text, owner = [], []
    for i, t in enumerate(ids):
        piece = tok.decode([t])
        text.append(piece)
        owner.extend([i] * len(piece))
    return "".join(text), owner


def find_tokens(tok, ids: list[int], answers: list[str], last: bool = True) -> list[int]:
    """Token positions in `ids` covering each answer string's (last, else first) occurrence (sorted, unique)."""
    text, owner = char_spans(tok, ids)
    found: set[int] = set()
    for answer in answers:
        at = text.rfind(answer) if last else text.find(answer)
        if at >= 0:
            found.update(owner[at:at + len(answer)])
    return sorted(found)


# ------------------------------------------------------------------------------------------------------------------
# selections and their recall of the needle
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One selection: d_frac (None: exact scores), k ("kf0.2" or "t512"), rerank factor (0: none), basis name."""

    d_frac: float | None
    k: str
    rerank: int = 0
    basis: str = "pre"

    @property
    def name(self) -> str:
        d = "exact" if self.d_frac is None else f"{self.basis}/d{self.d_frac:g}"
        return f"{d}/{self.k}" + (f"/rerank{self.rerank}x" if self.rerank else "")


def row_budgets(k: str, n: torch.Tensor, base: Budget, scale: int = 1) -> torch.Tensor:
    """Keys kept by rows seeing `n` [R] keys under k ("kf<frac>": `base` (rule, protected keys) at that k_frac;
    "t<count>": a token count, at least the protected keys), times `scale` (re-ranking candidates), never more
    than n: int64 [1, R]."""
    if k.startswith("kf"):
        kept = dataclasses.replace(base, k_frac=float(k[2:])).tokens(n)
    else:
        kept = torch.full_like(n, max(int(k[1:]), base.protected))
    return torch.minimum(kept * scale, n)[None]


def all_settings(bases: list[str]) -> list[Setting]:
    """Exact top-k at each k; each d at each k for the first basis, at the k_frac settings for the others;
    re-ranking at the default d."""
    out = [Setting(None, k) for k in K_SETTINGS]
    for i, b in enumerate(bases):
        out += [Setting(d, k, 0, b) for d in D_FRACS for k in K_SETTINGS if i == 0 or k.startswith("kf")]
    out += [Setting(DEFAULT.d_frac, k, c, bases[0]) for k, c in RERANK]
    return out


def read_cost(s: Setting, n: torch.Tensor, base: Budget) -> float:
    """Key + value bytes read by a sparse layer, relative to full attention, averaged over rows seeing `n` keys."""
    k = float((row_budgets(s.k, n, base).double() / n).mean())
    if s.d_frac is None:
        return k  # an oracle: the exact scores are not paid for
    if s.rerank:
        return s.d_frac / 2 + s.rerank * k / 2 + k / 2
    return s.d_frac / 2 + k


def exact_scores(q: torch.Tensor, k: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [R, H_q, D] post-RoPE queries of R decode rows; k: [H_kv, S, D] post-RoPE keys; n: int64 [R] keys each
    row sees (the first n). Returns exact scores q.k [1, H_kv, G, R, S] (float32) and visible [1, 1, R, S]."""
    r, hq, dh = q.shape
    hkv, s, _ = k.shape
    qg = q.float().reshape(r, hkv, hq // hkv, dh).permute(1, 2, 0, 3)[None]
    return qg @ k.float()[None, :, None].transpose(-1, -2), (torch.arange(s)[None] < n[:, None])[None, None]


def rotate(q: torch.Tensor, k: torch.Tensor, components: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """q [R, H_q, D] and k [H_kv, S, D] in each basis (name -> components [H_kv, D, D]; columns: directions)."""
    out = {}
    for name, p in components.items():
        p = p.float()
        per_query_head = p.repeat_interleave(q.shape[1] // p.shape[0], 0)  # [H_q, D, D]
        out[name] = (torch.einsum("rhd,hde->rhe", q.float(), per_query_head), k.float() @ p)
    return out


def select(st: Setting, q: torch.Tensor, k: torch.Tensor, n: torch.Tensor, rotated: dict[str, tuple],
           base: Budget) -> torch.Tensor:
    """The keys setting `st` keeps, bool [1, H_kv, G, R, S], for the rows of `exact_scores(q, k, n)`; rotated:
    `rotate(q, k, components)`. Loki's approximate scores: query and keys in the basis, their first d dims."""
    exact, visible = exact_scores(q, k, n)
    scores = exact
    if st.d_frac is not None:
        d = num_dims(st.d_frac, q.shape[-1])
        qr, kr = rotated[st.basis]
        scores = exact_scores(qr[..., :d], kr[..., :d], n)[0]
    if st.rerank:
        cand = selection_mask(scores, visible, row_budgets(st.k, n, base, st.rerank), base.sink_tokens,
                              base.recent_tokens, False)
        scores = exact.masked_fill(~cand, float("-inf"))
    budgets = row_budgets(st.k, n, base)
    return selection_mask(scores, visible, budgets, base.sink_tokens, base.recent_tokens, False)


def analyse_layer(q: torch.Tensor, k: torch.Tensor, n: torch.Tensor, needle: torch.Tensor,
                  components: dict[str, torch.Tensor], settings: list[Setting], base: Budget) -> dict[str, torch.Tensor]:
    """One layer, one request: q, k, n as `exact_scores` takes them; needle: int64 [N] key positions; base: the
    budget whose rule and protected keys every setting keeps. Returns per row and query head [R, H_q]: "mass"
    (exact attention on the needle), "target" (the needle position it attends most); per setting: "<name>/kept"
    (needle mass inside the selection), "<name>/hit" (target inside it), "<name>/all" (attention mass inside it)."""
    exact, visible = exact_scores(q, k, n)
    probs = torch.softmax((exact * q.shape[-1] ** -0.5).masked_fill(~visible[:, :, None], float("-inf")), -1)
    on_needle = probs[..., needle]  # [1, H_kv, G, R, N]
    target = needle[on_needle.argmax(-1)]  # [1, H_kv, G, R]

    def flat(x: torch.Tensor) -> torch.Tensor:  # [1, H_kv, G, R] -> [R, H_q]
        return x[0].flatten(0, 1).transpose(0, 1)

    out = {"mass": flat(on_needle.sum(-1)), "target": flat(target)}
    rotated = rotate(q, k, components)
    for st in settings:
        sel = select(st, q, k, n, rotated, base)
        out[f"{st.name}/kept"] = flat((on_needle * sel[..., needle]).sum(-1))
        out[f"{st.name}/hit"] = flat(sel.gather(-1, target[..., None])[..., 0])
        out[f"{st.name}/all"] = flat((probs * sel).sum(-1))
    return out


def analyse_request(queries: torch.Tensor, keys: torch.Tensor, n: torch.Tensor, needle: list[int],
                    components: dict[str, torch.Tensor], settings: list[Setting],
                    base: Budget) -> dict[str, torch.Tensor]:
    """queries [R, L, H_q, D], keys [L, H_kv, S, D], n [R], needle positions; components: name -> [L, H_kv, D, D].
    Returns each `analyse_layer` field stacked over layers: [R, L, H_q]."""
    needle_t = torch.tensor(needle, dtype=torch.int64)
    per_layer = [analyse_layer(queries[:, l], keys[l], n, needle_t, {b: c[l] for b, c in components.items()},
                               settings, base) for l in range(keys.shape[0])]
    return {key: torch.stack([x[key] for x in per_layer], 1) for key in per_layer[0]}


# ------------------------------------------------------------------------------------------------------------------
# requests
# ------------------------------------------------------------------------------------------------------------------

def load_requests(payload: str, docs: str, task: str, length: int, limit: int) -> list[dict[str, Any]]:
    """The exported RULER requests (scripts/long_context_offline.py export) of one task and length."""
    data = np.load(io.BytesIO(lzma.decompress(Path(payload).read_bytes())))
    offsets, ids = data["offsets"], data["ids"].astype(np.int64)
    meta = json.loads(str(data["meta"]))
    saved = json.loads(lzma.decompress(Path(docs).read_bytes()))
    if [m["tokens"] for m in saved["meta"]] != [m["tokens"] for m in meta]:
        raise SystemExit(f"{payload} and {docs} come from different exports: their request lengths differ")
    out = []
    for i, m in enumerate(meta):
        if m["task"] == task and m["length"] == length:
            out.append({"doc_id": m["doc_id"], "ids": torch.from_numpy(ids[offsets[i]:offsets[i + 1]]),
                        "answers": [str(a) for a in saved["docs"][i]["outputs"]]})
    if not out:
        raise SystemExit(f"no request of task {task!r} at length {length} in {payload}")
    return out[:limit]


def synthetic_requests(tok, length: int, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Passkey prompts of about `length` tokens (prose-free haystack as RULER's: one sentence repeated), the needle
    at evenly spread depths, chat-formatted like the instruct model expects."""
    rng = random.Random(seed)
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    per = len(tok(filler)["input_ids"])
    out = []
    for i in range(count):
        key = str(rng.randint(1_000_000, 9_999_999))
        needle = f"One of the special magic numbers for the request is: {key}. "
        reps = max(1, (length - 120) // per)
        at = int(reps * (i + 0.5) / count)
        body = filler * at + needle + filler * (reps - at)
        user = (f"{body}\nWhat is the special magic number for the request mentioned in the provided text?")
        prompt = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
        prompt += "The special magic number for the request mentioned in the provided text is"
        out.append({"doc_id": i, "ids": torch.tensor(tok(prompt)["input_ids"]), "answers": [key]})
    return out


def run_request(model, tok, basis: PCABasis, req: dict[str, Any], components: dict[str, torch.Tensor],
                settings: list[Setting], max_new: int) -> dict[str, Any] | None:
    """Analyse one request; None (with the reason printed) when full attention does not produce the answer."""
    ids = req["ids"]
    s0 = len(ids)
    tokens, queries, keys, prefill_kv = full_answer(model, ids, max_new)
    answer_rows = find_tokens(tok, tokens, req["answers"], last=False)
    needle = find_tokens(tok, ids.tolist(), req["answers"])
    loki_tokens = loki_answer(model, basis, prefill_kv, tokens[0], max_new)
    text, loki_text = tok.decode(tokens), tok.decode(loki_tokens)
    info = {"doc_id": req["doc_id"], "tokens": s0, "answers": req["answers"], "full": text, "loki_default": loki_text,
            "full_correct": all(a in text for a in req["answers"]),
            "loki_correct": all(a in loki_text for a in req["answers"]), "needle_positions": needle,
            "answer_rows": answer_rows}
    diverge = next((j for j, (a, b) in enumerate(zip(tokens, loki_tokens)) if a != b), None)
    info["loki_diverges_at_row"] = diverge
    rows = [j for j in answer_rows if j >= 1]  # row 0 is the prefill's (exact in mode "decode")
    if not info["full_correct"] or not needle or not rows:
        print(f"  doc {req['doc_id']}: skipped (full {text!r}, needle tokens {len(needle)})", flush=True)
        info["skipped"] = True
        return info
    n = torch.tensor([s0 + j for j in rows])  # row j (a decode step) sees the context and j generated tokens
    base = DEFAULT.budget()
    result = analyse_request(queries[rows], keys, n, needle, components, settings, base)
    info["rows"] = rows
    info["read_cost"] = {st.name: read_cost(st, n, base) for st in settings}
    info["result"] = {key: v.tolist() for key, v in result.items()}
    return info


# ------------------------------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------------------------------

def gather(done: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Every field over all analysed rows of all requests: [rows, L, H_q]."""
    keys = done[0]["result"].keys()
    return {k: torch.cat([torch.tensor(d["result"][k], dtype=torch.float64) for d in done]) for k in keys}


def recall(all_: dict[str, torch.Tensor], name: str, where: torch.Tensor, exact: str) -> float:
    """Among (row, layer, head) cases in `where` whose needle target is in the exact top-k `exact`, the share whose
    target is in selection `name` too."""
    base = where & (all_[f"{exact}/hit"] > 0)
    return float((all_[f"{name}/hit"] > 0)[base].double().mean()) if bool(base.any()) else float("nan")


def kept(all_: dict[str, torch.Tensor], name: str, layers: torch.Tensor) -> float:
    """Needle mass inside selection `name` over the exact needle mass, summed over rows and heads of `layers`."""
    return float(all_[f"{name}/kept"][:, layers].sum() / all_["mass"][:, layers].sum())


def summarize(done: list[dict[str, Any]], settings: list[Setting], num_layers: int, bases: list[str]) -> tuple[str, dict]:
    """Markdown tables and their numbers."""
    a = gather(done)
    mass = a["mass"]  # [rows, L, H_q]
    head_mass = mass.mean(0)  # [L, H_q]
    retrieval = mass > RETRIEVAL_MASS  # per case
    dense = dense_layer_set(DEFAULT.dense_layers, num_layers)
    sparse = torch.tensor([l not in dense for l in range(num_layers)])
    default = Setting(DEFAULT.d_frac, f"kf{DEFAULT.k_frac:g}", 0, bases[0]).name
    exact_default = Setting(None, f"kf{DEFAULT.k_frac:g}").name
    lines = [f"Per layer ({len(done)} requests, {mass.shape[0]} answer rows; retrieval case: needle mass > "
             f"{RETRIEVAL_MASS}; recall: share of retrieval cases whose most-attended needle token is in the "
             f"approximate top-k among those where it is in the exact top-k; kept: needle mass inside the selection "
             f"over all needle mass; default k = kf{DEFAULT.k_frac:g}, d = {DEFAULT.d_frac:g}, basis {bases[0]})", "",
             "| layer | max head mass (head) | retrieval heads | retrieval cases | exact top-k hit | recall default "
             "| kept default | recall d .125/.25/.5/1 | recall k .1/.2/.4 | kept t256/512/1024/2048 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    per_layer = []
    for l in range(num_layers):
        where = torch.zeros_like(retrieval)
        where[:, l] = retrieval[:, l]
        layer = torch.tensor([i == l for i in range(num_layers)])
        h = int(head_mass[l].argmax())
        exact_hit = float((a[f"{exact_default}/hit"] > 0)[where].double().mean()) if bool(where.any()) else float("nan")
        row = {"layer": l, "dense": l in dense, "max_head_mass": float(head_mass[l, h]), "max_head": h,
               "retrieval_heads": int((head_mass[l] > RETRIEVAL_MASS).sum()), "retrieval_cases": int(where.sum()),
               "exact_hit": exact_hit, "recall_default": recall(a, default, where, exact_default),
               "kept_default": kept(a, default, layer),
               "recall_d": [recall(a, Setting(d, f"kf{DEFAULT.k_frac:g}", 0, bases[0]).name, where, exact_default)
                            for d in D_FRACS],
               "recall_k": [recall(a, Setting(DEFAULT.d_frac, k, 0, bases[0]).name, where, Setting(None, k).name)
                            for k in ("kf0.1", "kf0.2", "kf0.4")],
               "kept_t": [kept(a, Setting(DEFAULT.d_frac, k, 0, bases[0]).name, layer)
                          for k in ("t256", "t512", "t1024", "t2048")]}
        per_layer.append(row)
        f = lambda xs: "/".join("–" if x != x else f"{x:.2f}" for x in xs)  # noqa: E731
        dflt = "dense | dense" if l in dense else f"{f([row['recall_default']])} | {row['kept_default']:.3f}"
        lines.append(f"| {l}{' (dense)' if l in dense else ''} | {row['max_head_mass']:.3f} ({h}) | "
                     f"{row['retrieval_heads']} | {row['retrieval_cases']} | {f([exact_hit])} | "
                     f"{dflt} | {f(row['recall_d'])} | "
                     f"{f(row['recall_k'])} | {f(row['kept_t'])} |")
    where = retrieval & sparse[None, :, None]
    cost = {st.name: float(np.mean([d["read_cost"][st.name] for d in done])) for st in settings}
    sweep = {}
    lines += ["", f"Sweep over the sparse layers ({', '.join(str(l) for l in range(num_layers) if l not in dense)} "
              "dense excluded): needle recall in retrieval cases (vs the exact top-k of the same k) / needle mass "
              "kept / attention mass kept (all heads); read cost of a sparse layer", "",
              "| selection | read cost | needle recall | needle mass kept | attention mass kept |", "|---|---|---|---|---|"]
    for st in settings:
        ex = Setting(None, st.k).name
        sweep[st.name] = {"read_cost": cost[st.name], "recall": recall(a, st.name, where, ex),
                          "needle_kept": kept(a, st.name, sparse),
                          "attention_kept": float(a[f"{st.name}/all"][:, sparse].mean())}
        v = sweep[st.name]
        lines.append(f"| {st.name} | {v['read_cost']:.3f} | {v['recall']:.3f} | {v['needle_kept']:.3f} | "
                     f"{v['attention_kept']:.3f} |")
    # the heads that read the needle, and what each setting leaves them
    top = sorted(((float(head_mass[l, h]), l, h) for l in range(num_layers) for h in range(mass.shape[2])
                  if l not in dense), reverse=True)[:15]
    lines += ["", "Heads reading the needle most (sparse layers): mean needle mass over answer rows; needle mass kept "
              "per setting", "",
              "| layer.head | mean mass | default | d 0.5 | d 1.0 | kf 0.4 | rerank | exact kf0.2 |"
              + "".join(f" {b} default |" for b in bases[1:]), "|---|---|---|---|---|---|---|---|" + "---|" * (len(bases) - 1)]
    heads = []
    for m, l, h in top:
        def kh(name: str) -> float:
            return float(a[f"{name}/kept"][:, l, h].sum() / mass[:, l, h].sum())
        vals = [kh(default), kh(Setting(0.5, "kf0.2", 0, bases[0]).name), kh(Setting(1.0, "kf0.2", 0, bases[0]).name),
                kh(Setting(DEFAULT.d_frac, "kf0.4", 0, bases[0]).name),
                kh(Setting(DEFAULT.d_frac, RERANK[0][0], RERANK[0][1], bases[0]).name), kh(exact_default)]
        vals += [kh(Setting(DEFAULT.d_frac, f"kf{DEFAULT.k_frac:g}", 0, b).name) for b in bases[1:]]
        heads.append({"layer": l, "head": h, "mass": m, "kept": vals})
        lines.append(f"| {l}.{h} | {m:.3f} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    failures = failed_rows(done, dense, default)
    lines += ["", "Requests the default answers wrong: at the row where its greedy answer first leaves full attention's "
              "(teacher-forced on full attention's answer), the retrieval cases of the sparse layers whose needle "
              "target the default selection misses (layer.head: needle mass, share of it the selection keeps)", "",
              "| doc | full | Loki default | row | missed |", "|---|---|---|---|---|"]
    for f in failures:
        missed = ", ".join(f"{l}.{h}: {m:.2f}/{k:.2f}" for l, h, m, k in f["missed"]) or "none"
        full, loki = (repr(x.split("<|")[0]) for x in (f["full"], f["loki"]))  # no "|" inside a table cell
        lines.append(f"| {f['doc_id']} | {full} | {loki} | {f['row']} | {missed} |")
    outcome = [(d["doc_id"], d["full_correct"], d["loki_correct"], d["loki_diverges_at_row"]) for d in done]
    return "\n".join(lines), {"per_layer": per_layer, "sweep": sweep, "heads": heads, "outcome": outcome,
                              "failures": failures, "head_mass": head_mass.tolist()}


def failed_rows(done: list[dict[str, Any]], dense: frozenset[int], default: str) -> list[dict[str, Any]]:
    """For each request the default answers wrong: the first row its answer differs at and, at that row, the
    (layer, head, needle mass, kept share) of the sparse layers' retrieval cases whose target the default misses."""
    out = []
    for d in done:
        if d["loki_correct"] or d["loki_diverges_at_row"] not in d["rows"]:
            continue
        j = d["loki_diverges_at_row"]
        i = d["rows"].index(j)
        mass = torch.tensor(d["result"]["mass"][i])  # [L, H_q]
        hit = torch.tensor(d["result"][f"{default}/hit"][i])
        kept_mass = torch.tensor(d["result"][f"{default}/kept"][i])
        missed = [(l, h, float(mass[l, h]), float(kept_mass[l, h] / mass[l, h]))
                  for l, h in ((l, h) for l in range(mass.shape[0]) for h in range(mass.shape[1]))
                  if l not in dense and mass[l, h] > RETRIEVAL_MASS and not hit[l, h]]
        out.append({"doc_id": d["doc_id"], "full": d["full"], "loki": d["loki_default"], "row": j,
                    "missed": sorted(missed, key=lambda x: -x[2])})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payload", help="payload.npz.xz of scripts/long_context_offline.py export")
    parser.add_argument("--docs", help="docs.json.xz of the same export")
    parser.add_argument("--synthetic", type=int, default=0, help="instead: passkey prompts of about this many tokens")
    parser.add_argument("--task", default="hfp_ruler_niah_single_1")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--basis", required=True, help="the pre-RoPE basis (default of patch_loki) directory")
    parser.add_argument("--post-basis", default=None, help="optional: a post-RoPE basis, swept as well")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-new", type=int, default=12, help="greedy tokens generated per request")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="JSON of every request's measurements and the summary")
    parser.add_argument("--resume", action="store_true", help="keep the requests --out already holds")
    parser.add_argument("--offset", type=int, default=0, help="skip this many requests first (split a run)")
    parser.add_argument("--merge", nargs="*", default=[], help="also keep the requests of these earlier --out files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from hf_patch.models.smollm2 import load_model

    model, tok = load_model(args.model)
    basis = PCABasis.load(args.basis)
    components = {"pre": basis.components}
    if args.post_basis:
        components["post"] = PCABasis.load(args.post_basis).components
    settings = all_settings(list(components))
    if args.synthetic:
        requests = synthetic_requests(tok, args.synthetic, args.offset + args.limit)
    else:
        requests = load_requests(args.payload, args.docs, args.task, args.length, args.offset + args.limit)
    requests = requests[args.offset:]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    infos = []
    names = [st.name for st in settings]
    for path in [*args.merge, *([out] if args.resume and out.is_file() else [])]:
        saved = json.loads(Path(path).read_text())
        bases = {k: saved["args"].get(k) for k in ("basis", "post_basis", "max_new")}
        if saved.get("settings") != names or bases != {k: getattr(args, k) for k in bases}:
            raise SystemExit(f"{path} was measured with other settings (bases or sweep): rerun without it")
        infos += [i for i in saved["requests"] if i["doc_id"] not in {j["doc_id"] for j in infos}]
    have = {i["doc_id"] for i in infos}
    done = [i for i in infos if not i.get("skipped")]
    for req in requests:
        if req["doc_id"] in have:
            continue
        t, cpu = time.time(), time.process_time()
        info = run_request(model, tok, basis, req, components, settings, args.max_new)
        info["cpu_s"] = round(time.process_time() - cpu, 1)
        infos.append(info)
        if not info.get("skipped"):
            done.append(info)
        print(f"  doc {req['doc_id']}: {len(req['ids'])} tokens, full {info['full']!r}, loki {info['loki_default']!r}"
              f" ({time.time() - t:.0f} s)", flush=True)
        out.write_text(json.dumps({"args": vars(args), "settings": names, "requests": infos}))
    table, summary = summarize(done, settings, basis.num_layers, list(components))
    print(f"\n{args.task if not args.synthetic else 'synthetic'} @ {args.length if not args.synthetic else args.synthetic}"
          f": torch threads {args.threads}, CPU time {sum(i.get('cpu_s', 0) for i in infos):.0f} s; Loki default correct "
          f"{sum(d['loki_correct'] for d in done)}/{len(done)} (full attention {len(done)}/{len(infos)})\n")
    print(table)
    out.write_text(json.dumps({"args": vars(args), "settings": names, "requests": infos, "summary": summary,
                               "table": table}))


if __name__ == "__main__":
    main()
