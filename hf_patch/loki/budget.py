"""How many principal dims (d) and keys (k) Loki spends, and which keys it always keeps: one definition that every
code path (the PyTorch path, the Triton decode and prefill kernels, CUDA graphs) reads.

A query row that sees ``n`` keys keeps ``k`` of them:

- ``k_rule="row"``: ``k = ceil(k_frac * n)``: every row keeps the same share of what it sees;
- ``k_rule="paper"`` (the official Loki evaluation): ``k = floor(k_frac * S)`` for the whole window of ``S``
  keys (per sequence: the keys its last row sees), and a row keeps ``min(n, k)``: the first ``k_frac`` of the rows
  of a window attend densely. In a decode step the row is the last of its window (``S = n``), so during
  generation ``S`` is the cache length at that step: the kept share stays ``k_frac`` of the keys read, as the
  bytes-read cost assumes. The rules then differ only in rounding.

Then, whatever the rule: ``k`` is at most ``k_tokens`` (a fixed number of keys, as SparQ and Quest spend them,
when set: ``k_frac=1, k_tokens=2048`` keeps 2,048 keys of any longer context, ``k_frac=0.25, k_tokens=2048`` the
smaller of a quarter and 2,048); at least 1; at least ``sink_tokens + recent_tokens`` (the first ``sink_tokens``
visible keys and the last ``recent_tokens``, the row's own key included, are always kept, and they count inside
``k``: protection changes which keys are read, not how many, unless ``k`` is smaller than the protected set; a
``k_tokens`` below it is refused); a row that sees at most ``min_tokens`` keys keeps all of them; and never more
than ``n``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass

import torch

K_RULES = ("row", "paper")


def check_fraction(name: str, value: float) -> float:
    """Validate a budget fraction in (0, 1] (any real number type, numpy's included; not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
    return float(value)


def check_count(name: str, value: int) -> int:
    """Validate a token count >= 0 (any integer type, numpy's included; not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def check_token_budget(value: int | None, protected: int = 0) -> int | None:
    """Validate `k_tokens`: None (no cap) or an int >= max(1, protected) (any integer type; not a bool); a cap below
    the protected keys could never apply (every row keeps those)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"k_tokens must be None or an int >= 1 (keys kept per row at most), got {value!r}")
    if value < protected:
        raise ValueError(f"k_tokens={value} is below the protected keys (sink_tokens + recent_tokens = {protected}), "
                         f"which every row keeps: pass k_tokens >= {protected} or fewer sink/recent tokens")
    return int(value)


def num_dims(d_frac: float, head_dim: int) -> int:
    """Principal dims used for the approximate scores: round(d_frac * D), at least 1."""
    return max(1, min(head_dim, round(check_fraction("d_frac", d_frac) * head_dim)))


@dataclass(frozen=True)
class Budget:
    """Keys kept per query row (see the module docstring). Validated on construction."""

    k_frac: float
    k_rule: str = "row"
    min_tokens: int = 0
    sink_tokens: int = 0
    recent_tokens: int = 0
    k_tokens: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "k_frac", check_fraction("k_frac", self.k_frac))
        if self.k_rule not in K_RULES:
            raise ValueError(f"k_rule must be one of {K_RULES}, got {self.k_rule!r}")
        for name in ("min_tokens", "sink_tokens", "recent_tokens"):
            object.__setattr__(self, name, check_count(name, getattr(self, name)))
        object.__setattr__(self, "k_tokens", check_token_budget(self.k_tokens, self.protected))

    @property
    def protected(self) -> int:
        """Keys every row keeps whatever their scores (first sink_tokens, last recent_tokens)."""
        return self.sink_tokens + self.recent_tokens

    def tokens(self, n_visible: torch.Tensor, window: torch.Tensor | None = None) -> torch.Tensor:
        """int64 keys kept per row, shaped like `n_visible` (int tensor, keys each row sees). `window`: the S of
        the paper rule, broadcastable to `n_visible` (default: `n_visible`, i.e. each row ends its window, as a
        decode step does). Pure tensor ops: no host sync, safe under CUDA-graph capture."""
        n = n_visible.to(torch.int64)
        if self.k_rule == "row":
            k = torch.ceil(n.to(torch.float64) * self.k_frac - 1e-9).to(torch.int64)
        else:
            s = n if window is None else window.to(torch.int64)
            k = torch.floor(s.to(torch.float64) * self.k_frac + 1e-9).to(torch.int64)
        if self.k_tokens is not None:
            k = k.clamp_max(self.k_tokens)
        k = k.clamp_min(max(1, self.protected))
        if self.min_tokens:
            k = torch.where(n <= self.min_tokens, n, k)
        return torch.minimum(k, n)

    def max_tokens(self, n_max: int) -> int:
        """Upper bound of `tokens` over rows that see (and windows of) at most `n_max` keys: `tokens(n_max)`, or
        more when min_tokens keeps a shorter row whole (min_tokens = 100, k_frac = 0.25: 101 keys keep 26, 100
        keep 100). Decode kernels size their index buffers by it."""
        return max(int(self.tokens(torch.tensor(n_max))), min(self.min_tokens, n_max))

    @functools.cached_property
    def dense_up_to(self) -> float:
        """The largest n such that every row seeing at most n keys keeps all of them (inf when k_frac is 1 and no
        k_tokens caps it; with k_frac = 1 and k_tokens, max(k_tokens, min_tokens)): a decode step over at most that
        many keys can attend densely, the same keys without scoring them."""
        if self.k_frac == 1.0 and self.k_tokens is None:
            return math.inf
        # the first n that keeps fewer than n lies within: past the protected keys, min_tokens and k_tokens, the
        # rule keeps fewer once n > 1 / (1 - k_frac) (k_frac < 1) or at once (k_frac = 1, capped by k_tokens)
        slack = math.ceil(1 / (1 - self.k_frac)) if self.k_frac < 1.0 else 0
        hi = max(1, self.protected, self.min_tokens, self.k_tokens or 0) + slack + 1
        n = torch.arange(1, hi + 1)
        fewer = (self.tokens(n) < n).nonzero()
        return int(fewer[0]) if len(fewer) else hi

    def describe(self) -> dict:
        """The settings as plain values (for results files)."""
        return dataclasses.asdict(self)


def read_cost(d_frac: float, k_frac: float, dense_layers: int = 0, num_layers: int = 1, k_tokens: int | None = None,
              context: int | None = None) -> float:
    """Key + value bytes a decode step reads, relative to full attention: a sparse layer reads d_frac of the
    keys for the approximate scores, then k_frac of the keys and values (d_frac / 2 + k_frac); a dense layer 1.
    With `k_tokens` the kept share depends on the length: give `context`, the keys a step reads; the share is then
    min(k_frac, k_tokens / context) (rounding and the protected keys' floor left out, as for k_frac)."""
    if k_tokens is not None:
        if context is None or context < 1:
            raise ValueError(f"read_cost with k_tokens={k_tokens} needs context (keys read per step, >= 1): the "
                             f"kept share is min(k_frac, k_tokens / context); got context={context!r}")
        k_frac = min(k_frac, k_tokens / context)
    sparse = d_frac / 2 + k_frac
    return (dense_layers + (num_layers - dense_layers) * sparse) / num_layers
