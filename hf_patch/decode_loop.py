"""Greedy decoding with the whole step on the device: `generate`'s loop for graph runners (`hf_patch.step_graphs`).

Why: with each one-token forward replayed as a CUDA graph, what is left of a decode step on the host is
`generate`'s own work (logits processing, token choice, stopping criteria), and its stop check reads the device
every token, so the host cannot queue the next step while the GPU runs this one.

How: a runner captures one graph per step that also takes the token choice and the stop check: the forward of the
token in `GreedyState.input_ids`, then `GreedyState.choose` (argmax of the last position's logits in float32,
end-of-sequence tokens banned below `min_new_tokens`, finished sequences given the pad token, `finished` updated,
the token written into a ring of `check_every` slots and fed to the next step). The host replays it and reads the
device once every `check_every` steps (`finished.all()`, and the ring copied into the output on the device); the
steps run past the last sequence's end are trimmed, so the result is exactly what `generate` returns.

Which calls: `greedy_call` accepts only greedy search that this loop reproduces exactly: do_sample False,
num_beams 1, `max_new_tokens` given, stopping by length and end-of-sequence tokens only, no logits processor
other than `min_new_tokens`'s, nothing returned but the sequences (no scores, no dict), no streamer; anything else
is None, and the caller runs Transformers' `generate`. The first new token comes from `generate` itself
(`max_new_tokens=1`: the prefill, its inputs and positions as Transformers prepares them); the loop takes the rest.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from .generation import CACHE_NAMES

# generation settings that do not change what greedy search returns: sampling warpers (applied only when
# do_sample), beam and assisted-decoding settings, max_length (max_new_tokens, required, takes precedence), the
# special tokens the loop does not read, version metadata; the loop reads max_new_tokens, min_new_tokens,
# eos_token_id, pad_token_id, do_sample, num_beams and use_cache itself
_IGNORED = {"temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
            "length_penalty", "early_stopping", "num_assistant_tokens", "num_assistant_tokens_schedule",
            "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind", "max_length",
            "bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config"}
_READ = {"max_new_tokens", "min_new_tokens", "eos_token_id", "pad_token_id", "do_sample", "num_beams", "use_cache"}
# generate() arguments that are not generation settings: accepted when empty (None, or an empty list of
# processors or criteria); `tokenizer` only serves stop_strings (which must be unset)
_EMPTY_OK = {"logits_processor", "stopping_criteria"}
_ANY_OK = {"tokenizer", *CACHE_NAMES}


@dataclass
class GreedyCall:
    """A `generate` call that the device loop reproduces: its prompt, mask and stopping rule.

    input_ids: [B, L]; attention_mask: [B, L] (as `generate` infers it when not given); eos: the end-of-sequence
    ids (None: stop by length only); pad: the token finished sequences get; first_kwargs: the call's keyword
    arguments for the first new token (`max_new_tokens=1`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    max_new_tokens: int
    min_new_tokens: int
    eos: list[int] | None
    pad: int | None
    first_kwargs: dict[str, Any]


def _neutral(name: str, value: Any, defaults: dict[str, Any]) -> bool:
    """Whether a setting is unset, off (False: no setting turns something on by being False) or its default."""
    return value is None or value is False or (name in defaults and value == defaults[name])


def greedy_call(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> GreedyCall | None:
    """The `GreedyCall` of `model.generate(*args, **kwargs)` when the device loop returns exactly what it does
    (see the module docstring), else None. May read the device once (whether padding is in a prompt without mask)."""
    if len(args) > 1:
        return None
    inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 or inputs.dtype != torch.long:
        return None
    config = model.generation_config
    defaults = getattr(GenerationConfig, "_get_default_generation_params", dict)()  # absent: None is neutral
    settings = {name: getattr(config, name, None) for name in {*GenerationConfig().to_dict(), *config.to_dict()}}
    rest = {}
    for name, value in kwargs.items():
        if name in ("input_ids", "inputs", "attention_mask"):
            continue
        if name in settings:
            settings[name] = value
        else:
            rest[name] = value
    if any(not _neutral(name, value, defaults) for name, value in settings.items() if name not in _IGNORED | _READ):
        return None
    for name, value in rest.items():
        if not (value is None or name in _ANY_OK or (name in _EMPTY_OK and len(value) == 0)
                or (name == "synced_gpus" and value is False)):
            return None
    if settings["do_sample"] or settings["num_beams"] not in (None, 1) or settings["use_cache"] is False:
        return None
    max_new, min_new = settings["max_new_tokens"], settings["min_new_tokens"]
    if not isinstance(max_new, int) or max_new < 1:
        return None
    eos = settings["eos_token_id"]
    eos = None if eos is None else torch.as_tensor(eos).flatten().tolist()  # an int, a list or a tensor
    pad = settings["pad_token_id"]
    if pad is None and eos:
        pad = eos[0]  # as generate does
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = _inferred_mask(inputs, pad, eos)
    elif mask.shape != inputs.shape:
        return None
    first = {**kwargs, "max_new_tokens": 1}
    if min_new is not None:
        first["min_new_tokens"] = min(min_new, 1)  # the first token's eos ban, without generate's length warning
    return GreedyCall(inputs, mask, max_new, min_new or 0, eos or None, pad, first)


def _inferred_mask(inputs: torch.Tensor, pad: int | None, eos: list[int] | None) -> torch.Tensor:
    """The mask `generate` builds for a prompt given without one: zeros at pad tokens if the prompt holds any and
    the pad token is not an end-of-sequence token, else ones."""
    if pad is not None and pad not in (eos or []) and bool((inputs == pad).any()):
        return inputs.ne(pad).long()
    return torch.ones_like(inputs)


@dataclass
class GreedyState:
    """What a greedy step reads and writes on the device (fixed addresses: a captured graph bakes them in).

    input_ids: int64 [B, 1], the token the step feeds (the step writes the next one); position_ids: int64 [B, 1],
    its position; finished: bool [B]; new_tokens: int64 [1], tokens generated so far; tokens: int64 [B, C], the
    ring of chosen tokens (token i in slot i % C); eos: int64 [E] (E = 0: no end-of-sequence tokens); pad,
    min_new: int64 [1].
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    finished: torch.Tensor
    new_tokens: torch.Tensor
    tokens: torch.Tensor
    eos: torch.Tensor
    pad: torch.Tensor
    min_new: torch.Tensor

    @classmethod
    def allocate(cls, batch: int, ring: int, n_eos: int, device: torch.device) -> GreedyState:
        def longs(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        return cls(longs(batch, 1), longs(batch, 1), torch.zeros(batch, dtype=torch.bool, device=device), longs(1),
                   longs(batch, ring), longs(n_eos), longs(1), longs(1))

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.input_ids, self.position_ids, self.finished, self.new_tokens, self.tokens, self.eos, self.pad,
                self.min_new)

    def fits(self, batch: int, ring: int, n_eos: int, device: torch.device) -> bool:
        """Whether this state serves a loop of that shape on that device."""
        return self.tokens.shape == (batch, ring) and self.eos.shape[0] == n_eos and self.tokens.device == device

    def key(self) -> tuple:
        """Addresses and shapes of the state: a graph captured on it replays while they hold."""
        return tuple((t.data_ptr(), tuple(t.shape)) for t in self._tensors())

    def choose(self, logits: torch.Tensor) -> None:
        """Device work only: the next token from the step's logits [B, T, V] (last position), as greedy search
        picks it, written to `tokens` and `input_ids`; `finished`, `position_ids` and `new_tokens` move on."""
        scores = logits[:, -1].to(torch.float32)
        has_eos = self.eos.shape[0] > 0
        if has_eos:  # MinNewTokensLengthLogitsProcessor: eos banned while fewer than min_new tokens are out
            vocab = torch.arange(scores.shape[-1], device=scores.device)
            banned = (vocab[:, None] == self.eos).any(-1) & (self.new_tokens < self.min_new)
            scores = torch.where(banned, -math.inf, scores)
        token = scores.argmax(-1)
        if has_eos:
            token = torch.where(self.finished, self.pad, token)
            self.finished |= (token[:, None] == self.eos).any(-1)
        self.tokens.index_copy_(1, self.new_tokens % self.tokens.shape[1], token[:, None])
        self.input_ids.copy_(token[:, None])
        self.position_ids.add_(1)
        self.new_tokens.add_(1)

    def saved(self) -> Callable[[], None]:
        """A copy of the state now, and the function that restores it (undoes a warm-up step before capture)."""
        copies = [t.clone() for t in self._tensors()]

        def restore() -> None:
            for t, copy in zip(self._tensors(), copies):
                t.copy_(copy)

        return restore

    def start(self, call: GreedyCall, first: torch.Tensor) -> None:
        """Set up the loop after `generate` gave the first new token (`first`: [B, L + 1]): positions continue
        those `generate` gives the prompt (mask cumsum - 1, 0 at padding)."""
        mask = call.attention_mask.to(first.device)
        last = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -1:]
        self.input_ids.copy_(first[:, -1:])
        self.position_ids.copy_(last + 1)
        self.new_tokens.fill_(1)
        self.tokens.zero_()
        if call.eos is not None:
            self.eos.copy_(torch.tensor(call.eos, dtype=torch.long))
            self.pad.fill_(call.pad)
            self.min_new.fill_(call.min_new_tokens)
            self.finished.copy_((first[:, -1:] == self.eos).any(-1))
        else:
            self.finished.zero_()


def all_finished(state: GreedyState) -> bool:
    """Whether every sequence is finished: the loop's only read of the device, once every ring's worth of steps."""
    return bool(state.finished.all())


def run_greedy(call: GreedyCall, first: torch.Tensor, state: GreedyState, step: Callable[[], None]) -> tuple[
        torch.Tensor, int]:
    """The loop: `step()` runs one step (the forward of `state.input_ids` and `state.choose`) until
    `call.max_new_tokens` tokens are out or every sequence is finished (checked once per ring of C steps).
    Returns (the sequences `generate` returns, [B, L + n], and how many steps ran past them: the caller drops
    them from its cache)."""
    batch, ring = state.tokens.shape
    out = first.new_empty(batch, call.max_new_tokens)
    out[:, 0] = first[:, -1]
    ran = flushed = 1
    stop = call.eos is not None and all_finished(state)
    while ran < call.max_new_tokens and not stop:
        step()
        ran += 1
        if ran % ring == 0 or ran == call.max_new_tokens:
            out[:, flushed:ran] = state.tokens[:, flushed % ring : (ran - 1) % ring + 1]
            flushed = ran
            stop = call.eos is not None and ran < call.max_new_tokens and all_finished(state)
    out = out[:, :ran]
    keep = ran
    if call.eos is not None:  # generate stops after the step that finishes the last sequence
        hit = (out[:, :, None] == state.eos).any(-1)
        ends = hit.int().argmax(1) + 1
        keep = int(torch.where(hit.any(1).all(), ends.max(), ran))
    return torch.cat([first, out[:, 1:keep]], dim=1), ran - keep
