"""Generation cache of the TransNormer: one recurrent linear-attention state per layer, O(1) in context length."""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class TransNormerCache(Cache):
    """Per-layer state `KV [B, H, D, E]` (float32) plus the count of tokens seen, including left padding.

    Unlike a KV cache it never grows: each new token updates `KV = lambda * KV + k^T v` in place of appending.
    States are set by the model (`update_state`) after each forward; `generate` only reads `get_seq_length`.
    """

    is_compileable = False
    is_croppable = False  # no rollback: transformers >= 5.25 refuses assisted generation on it (older: `_is_stateful`)

    def __init__(self, num_layers: int):
        super().__init__(layers=[])
        self.states: list[torch.Tensor | None] = [None] * num_layers
        self.seen_tokens = 0
        # Graphed steps (`hf_patch.transnormer.cuda_graph`): the position on the device (LRPE reads it), states
        # updated in place, the host count left to the caller. None: ordinary forwards.
        self.device_position: torch.Tensor | None = None

    def position(self) -> int | torch.Tensor:
        """Position of the next token (tokens consumed so far): an int, or int64 [1] on the device in graphed
        steps."""
        return self.seen_tokens if self.device_position is None else self.device_position

    def __len__(self) -> int:
        return len(self.states)

    def __repr__(self) -> str:
        shapes = [tuple(s.shape) if s is not None else None for s in self.states[:1]]
        return f"{type(self).__name__}(layers={len(self.states)}, seen_tokens={self.seen_tokens}, state={shapes})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens consumed so far (all sequences of the batch share this count; left padding included)."""
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_state(self, layer_idx: int) -> torch.Tensor | None:
        """State `[B, H, D, E]` of `layer_idx`, or None before the first token."""
        return self.states[layer_idx]

    def update_state(self, layer_idx: int, state: torch.Tensor) -> None:
        """Store the state of `layer_idx` after this forward (in place in graphed steps)."""
        if self.device_position is None:
            self.states[layer_idx] = state
        else:
            self.states[layer_idx].copy_(state)

    def advance(self, num_tokens: int) -> None:
        """Count the `num_tokens` tokens of a finished forward (called once per forward, after all layers; graphed
        steps count on the host outside the graph)."""
        if self.device_position is None:
            self.seen_tokens += num_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        self.states = [s.index_select(0, beam_idx.to(s.device)) if s is not None else None for s in self.states]

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row `repeats` times (contrastive search, expanded returns)."""
        self.states = [s.repeat_interleave(repeats, dim=0) if s is not None else None for s in self.states]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows `indices`."""
        self.reorder_cache(indices)

    def reset(self) -> None:
        """Forget everything (a fresh prompt)."""
        self.states = [None] * len(self.states)
        self.seen_tokens = 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "TransNormerCache holds a recurrent state that cannot be rolled back; assisted generation and other "
            "cache cropping are unsupported. Recompute the prefix instead."
        )
