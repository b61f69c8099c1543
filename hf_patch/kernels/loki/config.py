"""Launch settings of the Triton decode path (`LokiKernelConfig`) and how a stage spreads its work over programs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..launch import dot_options

TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class LokiKernelConfig:
    """Launch settings of the Triton path (block sizes in tokens; splits aim at `programs_per_sm` per SM)."""

    block_n_scores: int = 64
    block_n_attn: int = 32
    # warps of a split-attention program (H100 GPU time, (0.25, 0.25): 1 warp 57.9 / 35.8 / 190.4 / 99.3 us at
    # (B, S) = (1, 128k) / (1, 64k) / (8, 64k) / (16, 16k), 2 warps 63.3 / 41.1 / 192.1 / 99.0, 4 warps 70.7 /
    # 46.6 / 199.6 / 99.5: each program's tiles are tiny)
    attn_warps: int = 1
    programs_per_sm: int = 4
    num_warps: int = 4
    num_stages: int = 3
    select_block: int = 2048  # scores per tile of the selection kernels
    select_sample: int = 2048  # strided sample that brackets the k-th score (one program per row)
    select_warps: int = 8
    # Rows up to this length select with one program per row if there are at least `select_kernel_min_rows_per_sm`
    # rows per SM; longer rows, or fewer, with several programs per row. H100 selection GPU time (8 KV heads,
    # 2026-11-25): one program per row 39 / 38 / 38 / 69 / 28 us at (B, S) = (16, 16k) / (8, 16k) / (1, 16k) /
    # (8, 32k) / (16, 8k), several 56 / 40 / 21 / 55 / 41 us; past 32k several programs win at every B.
    select_kernel_max_seq: int = 32768
    select_kernel_min_rows_per_sm: float = 0.5
    multi_select_block: int = 1024  # scores per tile of the multi-program selection
    # Its bracket sample, which every program sorts: 256 keys make a wider bracket (more candidates for pass 2)
    # than 1024 but cost each program less; H100 GPU time of the whole step, (0.25, 0.25): 129.4 / 379.1 / 723.7 /
    # 711.0 us at (B, S) = (1, 128k) / (8, 64k) / (8, 128k) / (16, 64k) against 134.0 / 385.0 / 727.9 / 718.4
    # with 1024, and lower at every shape tried (1k-128k, B = 1 / 8 / 16).
    multi_select_sample: int = 256
    multi_select_max_chunks: int = 256  # programs per row at most
    multi_select_warps: int = 4
    # Caches up to this length run the whole step in one kernel, one program per selection row: fewer launches,
    # which pays where the host launches them one by one. Inside a CUDA graph launches cost no host time and the
    # three-stage form wins at every size measured (H100 GPU time, (0.25, 0.25), B = 1 / 8 / 16: fused 36.6 /
    # 37.5 / 41.3 us at S = 1k, 66.8 / 80.3 / 88.0 at 4k; three stages 32.6 / 37.4 / 40.3 and 37.2 / 57.6 / 74.7),
    # so captures use `graph_fused_max_seq`.
    fused_max_seq: int = 4096
    graph_fused_max_seq: int = 0
    block_n_fused: int = 128  # keys per tile of the fused kernel's scores stage
    block_n_fused_attn: int = 64  # kept keys per tile of the fused kernel's attention stage
    fused_warps: int = 4


DEFAULT_CONFIG = LokiKernelConfig()


def split_work(n: int, block: int, rows: int, target_programs: int, most: int | None = None) -> tuple[int, int]:
    """(splits per row, tiles per split) for `n` items in tiles of `block`, aiming at `target_programs` in all
    (at most `most` splits per row)."""
    tiles = max(1, triton.cdiv(n, block))
    splits = min(tiles, max(1, triton.cdiv(target_programs, rows)), most or tiles)
    per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, per_split), per_split


def launch_options(cfg: LokiKernelConfig, q: torch.Tensor) -> dict:
    """Launch options shared by the kernels that multiply."""
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dot_options(q))
