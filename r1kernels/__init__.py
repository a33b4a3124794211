"""r1kernels: kernels for DeepSeek-V3/R1-style training, exposed as torch ops (namespace ``torch.ops.r1k``)."""

from r1kernels import fp8, grpo, mla, moe
from r1kernels.backend import use_backend

__version__ = "0.1.0"
__all__ = ["fp8", "grpo", "mla", "moe", "use_backend"]
