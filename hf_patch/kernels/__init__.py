from .lightning import lightning_attn
from .lightning_torch import lightning_attn_chunked, lightning_attn_naive, lightning_attn_step
from .loki import DecodeWorkspace, dense_decode_attention, loki_decode_attention, loki_decode_attention_torch

__all__ = ["lightning_attn", "lightning_attn_chunked", "lightning_attn_naive", "lightning_attn_step"]
__all__ += ["DecodeWorkspace", "dense_decode_attention", "loki_decode_attention", "loki_decode_attention_torch"]
