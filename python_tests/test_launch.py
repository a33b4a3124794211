"""The launch pattern every family copies: one device guard for every launch, and compile coverage that
cannot drift (every launched kernel registered, in the configuration it launches with)."""

import ast
from pathlib import Path

import pytest
import torch
import triton

import r1kernels
from r1kernels import _launch, compile_registry
from r1kernels._launch import KernelConfig, cuda_stream, device_guard
from r1kernels._ops import OPS

PACKAGE = Path(r1kernels.__file__).parent


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text())


def _last_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _jit_kernels() -> dict[str, Path]:
    """Every function decorated with triton.jit (or triton.autotune / heuristics) in the package."""
    found = {}
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                for dec in node.decorator_list:
                    target = dec.func if isinstance(dec, ast.Call) else dec
                    if _last_name(target) in ("jit", "autotune", "heuristics"):
                        assert node.name not in found, f"two Triton functions named {node.name}"
                        found[node.name] = path
    return found


def test_every_launch_goes_through_the_device_guard():
    """No `kernel[grid](...)` and no stream lookup outside r1kernels/_launch.py."""
    kernels = _jit_kernels()
    offenders = []
    for path, tree in _sources():
        if path.name == "_launch.py":
            continue
        for node in ast.walk(tree):
            direct = isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
            if direct and _last_name(node.func.value) in kernels:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} launches a kernel directly")
            if isinstance(node, ast.Attribute) and node.attr == "current_stream":
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} picks a stream itself")
    assert not offenders


def test_every_launched_kernel_has_registered_variants():
    registered = {v.kernel.fn.__name__ for arch in compile_registry.ARCHS for v in compile_registry.all_variants(arch)}
    launched = set()
    for _, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _last_name(node.func) == "launch" and node.args:
                launched.add(_last_name(node.args[0]))
    assert launched, "no launches found"
    assert launched <= set(_jit_kernels()), "launch() is called with something that is not a Triton kernel"
    assert not launched - registered, f"launched but never compiled in the check: {launched - registered}"


def test_kernel_modules_are_found_by_walking_the_package():
    modules = compile_registry.kernel_modules()
    assert "r1kernels.fp8.kernels.quantize_tiles" in modules
    assert "r1kernels.grpo.kernels.matmul" in modules
    # every module that defines a Triton function is a kernel module, so the walk finds it
    for name, path in _jit_kernels().items():
        dotted = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        assert compile_registry.is_kernel_module(dotted), f"{name} lives outside a family's kernels package"


@pytest.mark.parametrize("name", sorted(OPS))
def test_launched_configs_are_the_registered_ones(name, monkeypatch, kernel_device):
    """Run each op's samples on the Triton backend and record every launch: each (kernel, tiles, warps,
    stages) is a registered variant's configuration, so the compile check covers what runs. The interpreter
    has no arch; its config functions take the sm_80 branch."""
    arch = compile_registry.ARCHS[0] if kernel_device == "cpu" else r1kernels.backend.device_arch(torch.device("cuda"))
    registered = [(v.kernel.fn.__name__, v.config) for v in compile_registry.all_variants(arch)]
    seen = []
    monkeypatch.setattr(
        _launch, "on_launch", lambda kernel, config, switches: seen.append((kernel.fn.__name__, config))
    )
    with r1kernels.use_backend("triton"):
        for sample in OPS[name].samples(kernel_device):
            OPS[name](*sample.args)
    if not OPS[name].triton:  # a CUDA C++ op: no Triton launch at all
        assert not seen, f"{name} is declared CUDA C++ only but launched {seen}"
        return
    assert seen, f"{name} launched no Triton kernel"
    missing = [s for s in seen if s not in registered]
    assert not missing, f"launched configurations not in the registry: {missing}"


def test_device_guard_on_cpu_tensors_makes_no_cuda_call(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("CUDA touched for a CPU tensor")

    for fn in ("device", "current_stream", "set_device", "current_device"):
        monkeypatch.setattr(torch.cuda, fn, forbidden)
    x = torch.randn(4, 128)
    with device_guard(x.device):
        pass
    with r1kernels.use_backend("triton"):
        r1kernels.fp8.quantize_per_token_group(x)  # a whole launch on CPU tensors


def test_device_guard_and_stream_follow_the_tensor_device(monkeypatch):
    """On a (pretend) second GPU the guard makes cuda:1 current and the stream is cuda:1's current one,
    whichever device was current before."""
    entered = []

    class FakeDeviceContext:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    class FakeStream:
        def __init__(self, device):
            self.cuda_stream = 0x1000 + torch.device(device).index

    monkeypatch.setattr(torch.cuda, "device", FakeDeviceContext)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    dev = torch.device("cuda", 1)
    with device_guard(dev):
        pass
    assert entered == [dev]
    assert cuda_stream(dev) == 0x1001


def test_variant_derives_the_signature_and_rejects_unknown_arguments():
    from r1kernels.grpo.kernels import matmul

    cfg = matmul.config(2, 90, "tf32")
    v = compile_registry.variant("t", matmul.matmul_kernel, cfg, types={"a_ptr": "*bf16", "b_ptr": "*bf16",
                                 "c_ptr": "*fp32"}, switches={"ACCUMULATE": True, "PRECISION": "tf32"},
                                 unit=("stride_ak",))  # fmt: skip
    assert v.signature["M"] == "i32" and v.signature["stride_ak"] == "constexpr" and v.constexprs["stride_ak"] == 1
    assert v.constexprs["BLOCK_M"] == cfg["BLOCK_M"] and v.num_warps == cfg.num_warps
    types = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32"}
    with pytest.raises(ValueError, match="neither a tile"):
        compile_registry.variant("t", matmul.matmul_kernel, cfg, types=types)
    with pytest.raises(ValueError, match="needs a type"):
        compile_registry.variant("t", matmul.matmul_kernel, cfg, types={}, switches={"ACCUMULATE": True,
                                 "PRECISION": "tf32"})  # fmt: skip
    with pytest.raises(ValueError, match="not parameters"):
        compile_registry.variant("t", matmul.matmul_kernel, cfg, types={**types, "nope": "i32"},
                                 switches={"ACCUMULATE": True, "PRECISION": "tf32"})  # fmt: skip


def test_autotune_lists_are_enumerated():
    @triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=2, num_stages=2),
                              triton.Config({"BLOCK": 128}, num_warps=4, num_stages=3)], key=["n"])  # fmt: skip
    @triton.jit
    def toy_kernel(x_ptr, n, BLOCK: triton.language.constexpr):
        pass

    configs = compile_registry.autotune_configs(toy_kernel)
    assert configs == [KernelConfig({"BLOCK": 64}, 2, 2), KernelConfig({"BLOCK": 128}, 4, 3)]
    variants = [compile_registry.variant(f"toy{i}", toy_kernel.fn, c, types={"x_ptr": "*fp32"}) for i, c in
                enumerate(configs)]  # fmt: skip
    assert [v.constexprs["BLOCK"] for v in variants] == [64, 128]
