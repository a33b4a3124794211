"""The 32-bit offset check on Triton IR: it flags an int32 index times a runtime stride, accepts the 64-bit
forms. Every registered kernel passes it: compile_report.check() fails a kernel with such a product."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent("""
    import json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from r1kernels.ttir_checks import int32_index_products

    @triton.jit
    def wraps(x_ptr, K, stride, BLOCK: tl.constexpr):
        for k0 in range(0, K, BLOCK):
            kk = k0 + tl.arange(0, BLOCK)
            tl.store(x_ptr + kk * stride, 1.0)  # (K - 1) * stride in 32 bits

    @triton.jit
    def widened(x_ptr, K, stride, BLOCK: tl.constexpr):
        for k0 in range(0, K, BLOCK):
            kk = (k0 + tl.arange(0, BLOCK)).to(tl.int64)
            tl.store(x_ptr + kk * stride, 1.0)

    @triton.jit
    def pointer_steps(x_ptr, K, stride, BLOCK: tl.constexpr):
        ptrs = x_ptr + tl.arange(0, BLOCK).to(tl.int64) * stride
        for k0 in range(0, K, BLOCK):
            tl.store(ptrs, 1.0)
            ptrs += BLOCK * stride

    out = {}
    for fn in (wraps, widened, pointer_steps):
        src = ASTSource(fn=fn, signature={"x_ptr": "*fp32", "K": "i32", "stride": "i32", "BLOCK": "constexpr"},
                        constexprs={"BLOCK": 64})
        ttir = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ttir"]
        out[fn.__name__] = int32_index_products(ttir)
    json.dump(out, sys.stdout)
""")


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """Compile three toy kernels (in a subprocess: this session may run Triton's interpreter)."""
    script = tmp_path_factory.mktemp("ttir") / "probe.py"  # a file: triton.jit reads the kernel's source
    script.write_text(_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_flags_a_32_bit_index_times_stride(probe):
    assert len(probe["wraps"]) == 1 and "arith.muli" in probe["wraps"][0]


def test_accepts_64_bit_indices_and_pointer_steps(probe):
    assert probe["widened"] == [] and probe["pointer_steps"] == []
