"""A DeepSeek-V3-shaped causal LM built from r1kernels ops (MLA, MoE, FP8 experts), HF-compatible state dicts."""

from r1kernels.model.config import ModelConfig
from r1kernels.model.deepseek_v3 import DeepseekV3ForCausalLM

__all__ = ["DeepseekV3ForCausalLM", "ModelConfig"]
