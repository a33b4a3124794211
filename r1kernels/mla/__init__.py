"""DeepSeek-V3 multi-head latent attention: training attention with one rope key shared by all heads, and
decode over a paged latent cache."""

from r1kernels.mla.attention import mla_attention
from r1kernels.mla.decode import append_to_cache, mla_decode
from r1kernels.mla.layer import MLA, RMSNorm

__all__ = ["MLA", "RMSNorm", "append_to_cache", "mla_attention", "mla_decode"]
