"""DeepSeek-V3 multi-head latent attention: training attention with one rope key shared by all heads."""

from r1kernels.mla.attention import mla_attention

__all__ = ["mla_attention"]
