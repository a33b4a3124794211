"""Every public op is a torch.library op in the r1k namespace, passes opcheck on the sample inputs it
registers itself, and is cheap to call in eager mode without leaving torch.compile's sight."""

import pytest
import torch
from conftest import HAS_GPU

import r1kernels
from r1kernels._ops import OPS


def test_every_op_registers_samples_and_lives_in_the_r1k_namespace():
    assert OPS, "no ops registered"
    for name, op in OPS.items():
        assert op.samples is not None, f"{name} registers no sample inputs for opcheck"
        assert hasattr(torch.ops.r1k, name)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_opcheck(name, backend):
    device = "cuda" if (HAS_GPU and backend == "triton") else "cpu"
    samples = list(OPS[name].samples(device))
    assert samples
    with r1kernels.use_backend(backend):
        for sample in samples:
            narrowed = {} if sample.test_utils is None else {"test_utils": sample.test_utils}
            torch.library.opcheck(getattr(torch.ops.r1k, name), sample.args, **narrowed)


def test_eager_calls_skip_the_dispatcher_and_compiled_calls_use_it(monkeypatch):
    """Eager: the implementation directly (no torch.library dispatch); under torch.compile: the op."""
    op = OPS["quantize_fp8_per_token_group"]
    calls, impl = [], op.impl
    monkeypatch.setattr(op, "impl", lambda *a: calls.append(a) or impl(*a))
    x = torch.randn(2, 128)
    r1kernels.fp8.quantize_per_token_group(x)
    assert len(calls) == 1

    seen = []

    def spy(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    monkeypatch.undo()
    torch.compile(lambda t: r1kernels.fp8.quantize_per_token_group(t)[1], backend=spy, fullgraph=True)(x)
    assert any("r1k.quantize_fp8_per_token_group" in s for s in seen), seen


def test_eager_autograd_path_matches_the_registered_op():
    hidden = torch.randn(5, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    ids = torch.randint(0, 30, (5,))
    grads = []
    for call in (OPS["token_logprob_stats"], torch.ops.r1k.token_logprob_stats):
        logp, _, entropy = call(hidden, weight, None, ids, 0.8, True)
        grads.append(torch.autograd.grad((logp + 0.3 * entropy).sum(), (hidden, weight)))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_eager_calls_route_tensor_subclasses_to_the_op_and_gradients_to_autograd(monkeypatch):
    """A tensor subclass (which may trace or carry its own dispatch) goes through the registered op; plain tensors
    and Parameters take the implementation, through the eager autograd function when one needs a gradient."""
    op = OPS["token_logprob_stats"]
    seen = []
    monkeypatch.setattr(op, "op", lambda *a: seen.append("op"))
    monkeypatch.setattr(op, "impl", lambda *a: seen.append("impl"))
    monkeypatch.setattr(op.autograd, "apply", lambda *a: seen.append("autograd"))

    class Marked(torch.Tensor):
        pass

    hidden, weight, ids = torch.randn(2, 8), torch.randn(5, 8), torch.tensor([1, 4])
    op(hidden, weight, None, ids, 1.0, False)
    op(hidden, torch.nn.Parameter(weight, requires_grad=False), None, ids, 1.0, False)
    op(hidden, weight.as_subclass(Marked), None, ids, 1.0, False)
    op(hidden, torch.nn.Parameter(weight), None, ids, 1.0, False)
    with torch.no_grad():
        op(hidden, torch.nn.Parameter(weight), None, ids, 1.0, False)
    assert seen == ["impl", "impl", "op", "autograd", "impl"]
