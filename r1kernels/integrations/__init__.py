"""Drop-ins for the trainers users already have: ``transformers`` (DeepSeek-V3 models on r1kernels ops) and
``trl`` (the fused GRPO loss inside TRL's GRPOTrainer). Each imports its framework only when used."""
