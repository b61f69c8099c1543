"""Which keys a query row attends to: a selection policy, one small class (as a press is in kvpress).

A policy answers three questions, each in one place:

- budget: how many keys each row keeps (`Budget.tokens`; the decode kernels' bound `max_tokens`);
- protection: which keys always stay whatever their rank (each row's first ``sink`` and last ``recent`` visible
  keys, counted inside the budget);
- ranking: how the other keys are chosen: by the dot product of the query and the key on the first ``d`` dims of
  the layer's PCA basis, ``d`` per KV head (`rank_dims`). This is the hook the kernels take: the PyTorch path, the
  prefill kernels and the decode kernels all score on those dims.

`LokiRanking` is Loki's rule (the approximate scores on the first d principal dims); `ExactRanking` scores with
all D dims, i.e. the exact scores (the basis is orthogonal): exact top-k, an oracle to measure what the
approximation loses, on every path (the kernels with d = D). A new ranking is one subclass and its kernel hook.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .budget import Budget


@dataclass(frozen=True)
class SelectionPolicy:
    """Budget, protection and ranking of one layer's key selection (see the module docstring). Subclasses give
    the ranking (`rank_dims`)."""

    budget: Budget

    name: ClassVar[str] = ""  # the `LokiSettings.ranking` value that selects the subclass

    @property
    def sink(self) -> int:
        """Each row's first visible keys, always kept."""
        return self.budget.sink_tokens

    @property
    def recent(self) -> int:
        """Each row's last visible keys (its own included), always kept."""
        return self.budget.recent_tokens

    def keys_per_row(self, n_visible: torch.Tensor, window: torch.Tensor | None = None) -> torch.Tensor:
        """int64 keys kept per row, shaped like `n_visible` (`Budget.tokens`: protected keys included)."""
        return self.budget.tokens(n_visible, window)

    def max_keys(self, n_max: int) -> int:
        """Most keys a row that sees at most `n_max` keys keeps (`Budget.max_tokens`)."""
        return self.budget.max_tokens(n_max)

    @property
    def dense_up_to(self) -> float:
        """Rows that see at most this many keys keep all of them (`Budget.dense_up_to`)."""
        return self.budget.dense_up_to

    def rank_dims(self, dims: torch.Tensor, head_dim: int) -> torch.Tensor:
        """int64 [H_kv]: the basis dims each KV head ranks keys with, from the layer's allocated `dims` [H_kv]
        (`allocate_dims` of d_frac) and the head dim D."""
        raise NotImplementedError


@dataclass(frozen=True)
class LokiRanking(SelectionPolicy):
    """Loki's rule: rank by the approximate scores on the first d_j principal dims of KV head j."""

    name: ClassVar[str] = "loki"

    def rank_dims(self, dims: torch.Tensor, head_dim: int) -> torch.Tensor:
        return dims


@dataclass(frozen=True)
class ExactRanking(SelectionPolicy):
    """Exact top-k (an oracle): rank by the exact scores, on all D dims of the basis (d_frac ignored)."""

    name: ClassVar[str] = "exact"

    def rank_dims(self, dims: torch.Tensor, head_dim: int) -> torch.Tensor:
        return torch.full_like(dims, head_dim)


RANKINGS: dict[str, type[SelectionPolicy]] = {cls.name: cls for cls in (LokiRanking, ExactRanking)}
