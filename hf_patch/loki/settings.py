"""The Loki settings as one typed schema: what `patch_loki`, the `hf-loki` lm-eval model, `hf-patch perplexity`'s
flags and the settings lists of `hf-patch main` / `compare` accept, checked field by field with
`hf_patch.loki.budget`'s checks. A knob is one field of `LokiSettings` (default, parser, help): `patch_loki`'s
keywords, the command-line flags (`hf_patch.app.cli.add_schema_flags`), hf-loki's model args and the config keys
all come from the fields; a budget knob is also the `Budget` field of the same name that gives it its meaning
(`LokiSettings.budget` passes every shared field). Dicts only at the JSON/YAML boundary: a `LokiSettings` travels
whole from the config or the flags to `patch_loki`, which hands its `Budget` to every layer, whose numbers and
tensors the kernels take.

`mode` when a setting leaves it out, per consumer (one default each, for one reason each):

- `patch_loki` (`LokiSettings`): "decode": generation is what patching speeds up, and prefill stays exact;
- the `hf-loki` lm-eval model (`LmEvalLoki`) and `hf-patch compare` (its config's `mode`): "all": lm-eval scores
  teacher-forced rows, and Loki on every row is what the paper measures;
- `hf-patch main` and `hf-patch perplexity`: set by the evaluation ("decode" for the decode-equivalent one, under
  `decode_rows`; "all" for whole windows), never left to a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, Schema, as_float, as_int, flag, one_of, optional, setting, text
from .attention import GQA_SELECT, MODES
from .budget import K_RULES, Budget, check_count, check_fraction, check_token_budget
from .calibrate import ROTARY
from .dims import D_POLICIES
from .selection import RANKINGS, SelectionPolicy


def fraction(name: str, value: Any) -> float:
    """A budget fraction in (0, 1] (numpy scalars and numeric strings included, bools refused)."""
    return check_fraction(name, as_float(name, value))


def count(name: str, value: Any) -> int:
    """A token or layer count >= 0."""
    return check_count(name, as_int(name, value))


def token_budget(name: str, value: Any) -> int | None:
    """Keys kept per row at most: None (no cap) or an int >= 1 (checked against the protected keys by `Budget`)."""
    return None if value is None else check_token_budget(as_int(name, value))


def dense_layers(name: str, value: Any) -> int | list[int]:
    """A count of layers from the bottom, or a list of distinct layer indices (each >= 0; a flag's "0,5" too)."""
    if isinstance(value, str) and "," in value:
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        return count(name, value)
    indices = [count(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if len(set(indices)) != len(indices):
        raise ConfigError(f"{name} must list distinct layer indices, got {list(value)!r}")
    return indices


@dataclass
class LokiSettings(Schema):
    """`patch_loki`'s settings (see its docstring for their meaning); its defaults are these.

    The default budget is the best setting at the paper's read cost (0.375 of full attention's key + value bytes
    per decode step) in the sweep of BENCHMARKS.md ("Loki budget sweep": SmolLM2-135M, decode-equivalent
    perplexity on the calibration split): d_frac 0.25 and k_frac 0.2 by the paper's rule, the first 4 and last 64
    keys of every row always kept, the first 2 layers dense (read cost 0.370 on 30 layers); no token cap.
    """

    d_frac: float = setting(0.25, fraction, help="share of the head dim scored by the approximate scores, in (0, 1]")
    k_frac: float = setting(0.2, fraction, help="share of the keys each query row keeps, in (0, 1], by k_rule")
    k_tokens: int | None = setting(None, token_budget, help="at most this many keys per row: the budget is the "
                                   "smaller of this and k_frac's (k_frac=1: a fixed budget, as SparQ/Quest spend)")
    mode: str = setting("decode", one_of(*MODES), help="decode: exact prefill, Loki for each generated token; all: "
                        "Loki on every query row")
    d_policy: str = setting("uniform", one_of(*D_POLICIES), help="uniform, or variance: the same average d spent "
                            "where the key variance needs it")
    gqa_select: str = setting("query", one_of(*GQA_SELECT), help="query: each query head picks its keys; group: "
                              "one pick per KV head")
    cuda_graph: bool = setting(False, flag, help="replay one-token decode steps as CUDA graphs")
    k_rule: str = setting("paper", one_of(*K_RULES), help="paper: k_frac of the whole window; row: of the keys "
                          "each row sees")
    min_tokens: int = setting(0, count, help="a row that sees at most this many keys keeps all of them")
    sink_tokens: int = setting(4, count, help="the first keys of every row, always kept (counted inside k)")
    recent_tokens: int = setting(64, count, help="the last keys of every row (its own included), always kept "
                                 "(counted inside k)")
    dense_layers: int | list[int] = setting(2, dense_layers, help="layers with full attention: a count from the "
                                            "bottom, or indices i,j,...")
    ranking: str = setting("loki", one_of(*RANKINGS), help="how the keys past the protected ones are chosen: loki "
                           "(approximate scores on d_frac of the dims); exact (exact top-k, an oracle; d_frac unused)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.budget()  # the checks across fields (k_tokens against the protected keys)

    def budget(self) -> Budget:
        """Keys kept per query row: the `Budget` of the fields it shares with these settings (a budget knob is a
        field of both)."""
        return Budget(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Budget)})

    def policy(self) -> SelectionPolicy:
        """The selection policy every Loki layer holds: the `ranking` rule's class over `budget()`."""
        return RANKINGS[self.ranking](self.budget())

    def replace(self, **overrides: Any) -> LokiSettings:
        """A copy with `overrides` set (checked); the same object when there are none."""
        return dataclasses.replace(self, **overrides) if overrides else self

    def patch_settings(self) -> LokiSettings:
        """The `LokiSettings` part of a subclass's values (what `patch_loki` takes); itself for a `LokiSettings`."""
        if type(self) is LokiSettings:
            return self
        return LokiSettings(**{k: getattr(self, k) for k in LokiSettings.keys()})


@dataclass
class SweepSetting(LokiSettings):
    """One Loki setting of `hf-patch main` / `compare`: `patch_loki`'s settings (its defaults where left out), the
    basis's rotary variant and an optional display name. Its mode is the evaluation's (see the module
    docstring)."""

    rotary: str = setting("pre", one_of(*ROTARY))
    name: str | None = setting(None, optional(text))


@dataclass
class LmEvalLoki(LokiSettings):
    """The Loki model args of the `hf-loki` lm-eval model: a basis directory and an optional rotary check; mode
    defaults to "all" (see the module docstring)."""

    basis: str | None = setting(None, optional(text))
    mode: str = setting("all", one_of(*MODES))
    rotary: str | None = setting(None, optional(one_of(*ROTARY)))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rotary is not None and self.basis is None:
            raise ConfigError("rotary was given without a basis: pass basis=<dir of a saved PCABasis> to use Loki")
