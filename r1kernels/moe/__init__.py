"""DeepSeek-V3 mixture of experts: routing, the permutation to expert-sorted rows and back, grouped expert
GEMMs, and the MoE layer."""

from r1kernels.moe.balance import sequence_balance_loss, tokens_per_expert, update_correction_bias
from r1kernels.moe.fp8_grouped_linear import fp8_grouped_linear
from r1kernels.moe.grouped_linear import grouped_linear
from r1kernels.moe.layer import MoE, routed_experts
from r1kernels.moe.permutation import PermutationIndex, max_rows, permutation_index
from r1kernels.moe.permute import moe_permute, moe_permute_fp8
from r1kernels.moe.route import route
from r1kernels.moe.swiglu import swiglu
from r1kernels.moe.unpermute import moe_unpermute

__all__ = [
    "MoE",
    "PermutationIndex",
    "fp8_grouped_linear",
    "grouped_linear",
    "max_rows",
    "moe_permute",
    "moe_permute_fp8",
    "moe_unpermute",
    "permutation_index",
    "route",
    "routed_experts",
    "sequence_balance_loss",
    "swiglu",
    "tokens_per_expert",
    "update_correction_bias",
]
