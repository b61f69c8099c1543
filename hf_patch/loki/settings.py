"""The Loki settings as one typed schema: what `patch_loki`, the `hf-loki` lm-eval model and the settings lists
of `hf-patch main` / `compare` accept, checked field by field with `hf_patch.loki.budget`'s checks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, Schema, as_float, as_int, flag, one_of, optional, setting, text
from .attention import GQA_SELECT, MODES
from .budget import K_RULES, Budget, check_count, check_fraction
from .calibrate import ROTARY
from .dims import D_POLICIES


def fraction(name: str, value: Any) -> float:
    """A budget fraction in (0, 1] (numpy scalars and numeric strings included, bools refused)."""
    return check_fraction(name, as_float(name, value))


def count(name: str, value: Any) -> int:
    """A token or layer count >= 0."""
    return check_count(name, as_int(name, value))


def dense_layers(name: str, value: Any) -> int | list[int]:
    """A count of layers from the bottom, or a list of distinct layer indices (each >= 0)."""
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
    keys of every row always kept, the first 2 layers dense (read cost 0.370 on 30 layers).
    """

    d_frac: float = setting(0.25, fraction)
    k_frac: float = setting(0.2, fraction)
    mode: str = setting("decode", one_of(*MODES))
    d_policy: str = setting("uniform", one_of(*D_POLICIES))
    gqa_select: str = setting("query", one_of(*GQA_SELECT))
    cuda_graph: bool = setting(False, flag)
    k_rule: str = setting("paper", one_of(*K_RULES))
    min_tokens: int = setting(0, count)
    sink_tokens: int = setting(4, count)
    recent_tokens: int = setting(64, count)
    dense_layers: int | list[int] = setting(2, dense_layers)

    def budget(self) -> Budget:
        """Keys kept per query row."""
        return Budget(self.k_frac, self.k_rule, self.min_tokens, self.sink_tokens, self.recent_tokens)

    def patch_args(self) -> dict[str, Any]:
        """Keyword arguments of `patch_loki` (the `LokiSettings` fields only)."""
        return {k: v for k, v in self.as_dict().items() if k in LokiSettings.keys()}


@dataclass
class SweepSetting(LokiSettings):
    """One Loki setting of `hf-patch main` / `compare`: `patch_loki`'s settings (its defaults where left out), the
    basis's rotary variant and an optional display name. mode defaults to "all" (what perplexity and lm-eval
    measure; `hf-patch main` sets it per evaluation)."""

    mode: str = setting("all", one_of(*MODES))
    rotary: str = setting("pre", one_of(*ROTARY))
    name: str | None = setting(None, optional(text))


@dataclass
class LmEvalLoki(LokiSettings):
    """The Loki model args of the `hf-loki` lm-eval model: a basis directory and an optional rotary check."""

    basis: str | None = setting(None, optional(text))
    mode: str = setting("all", one_of(*MODES))
    rotary: str | None = setting(None, optional(one_of(*ROTARY)))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rotary is not None and self.basis is None:
            raise ConfigError("rotary was given without a basis: pass basis=<dir of a saved PCABasis> to use Loki")
