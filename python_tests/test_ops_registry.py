"""Every public op is a torch.library op in the r1k namespace, and every one has an opcheck test."""

import torch

import r1kernels  # noqa: F401  (importing registers the ops)
from r1kernels._ops import OPS

# op -> the test that runs torch.library.opcheck on it
OPCHECKED = {
    "quantize_fp8_per_token_group": "test_fp8_quantize.py::test_opcheck",
    "quantize_fp8_per_block": "test_fp8_quantize.py::test_opcheck",
    "dequantize_fp8_per_token_group": "test_fp8_quantize.py::test_opcheck",
    "dequantize_fp8_per_block": "test_fp8_quantize.py::test_opcheck",
    "token_logprob_stats": "test_grpo_token_logprobs.py::test_opcheck",
    "token_logprob_stats_backward": "test_grpo_token_logprobs.py::test_opcheck",
}


def test_every_registered_op_is_opchecked():
    assert set(OPS) == set(OPCHECKED), "a new op needs an opcheck test and an entry in OPCHECKED"


def test_ops_live_in_the_r1k_namespace():
    for name in OPS:
        assert hasattr(torch.ops.r1k, name)
