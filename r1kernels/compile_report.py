"""Ahead-of-time compile check: build every registered Triton kernel for sm_80, sm_89 and sm_90a
without a GPU and read the result like a profiler.

    python -m r1kernels.compile_report [--arch 90] [--filter fp8] [--markdown out.md] [--cuda]

For each kernel and arch it reports registers, stack / local memory (spills), shared memory, the MMA
instructions in the SASS, 16-byte global accesses and TMA (bulk tensor) copies. ``check(row)`` lists
the problems that fail the test suite: any local memory or stack, shared memory over the chip limit,
a matrix kernel without wgmma on sm_90a, a 32-bit product of an index and a stride (``ttir_checks``).
``--cuda`` adds the CUDA C++ kernels of csrc/ (sm_80, sm_90a), built with the ptxas flags of the real
build, where spills and local memory are errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from r1kernels.compile_registry import ARCH_NAMES, ARCHS, SHARED_LIMIT, KernelVariant, all_variants
from r1kernels.ttir_checks import int32_index_products


@dataclass
class CompileRow:
    name: str
    arch: int
    kind: str
    registers: int
    stack: int
    local: int
    shared: int
    mma: str
    wgmma_ptx: int
    vec16_global: int
    tma: int
    cp_async: int = 0
    i32_index_products: int = 0  # 32-bit (index x runtime integer) products in the TTIR: offsets that wrap
    error: str = ""


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in the triton wheel at {path}")
    return str(path)


def compile_variant(v: KernelVariant, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arg_names = v.kernel.arg_names
    attrs = {(arg_names.index(a),): [["tt.divisibility", 16]] for a in v.aligned}
    src = ASTSource(fn=v.kernel, signature=v.signature, constexprs=dict(v.constexprs), attrs=attrs)
    return triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": v.num_warps, "num_stages": v.num_stages}
    )


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_MMA = re.compile(r"\b(HGMMA|QGMMA|IGMMA|HMMA|QMMA|IMMA|DMMA)\b")


def analyse(v: KernelVariant, arch: int) -> CompileRow:
    try:
        compiled = compile_variant(v, arch)
    except Exception as err:  # a kernel that does not build is a reported failure, not a crash
        return CompileRow(
            v.name,
            arch,
            v.kind,
            0,
            0,
            0,
            0,
            "",
            0,
            0,
            0,
            error=f"{type(err).__name__}: {str(err).strip().splitlines()[-1]}",
        )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    m = _RES.search(res)
    regs, stack, _, local = (int(g) for g in m.groups()) if m else (-1, -1, -1, -1)
    ptx = compiled.asm["ptx"]
    mma_ops = sorted(set(_MMA.findall(sass)))
    return CompileRow(
        name=v.name,
        arch=arch,
        kind=v.kind,
        registers=regs,
        stack=stack,
        local=local,
        shared=int(compiled.metadata.shared),
        mma="/".join(mma_ops) or "-",
        wgmma_ptx=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        vec16_global=len(re.findall(r"\b(?:ld|st)\.global(?:\.[a-z0-9:]+)*\.v4\.(?:b32|f32|u32|s32)", ptx))
        + len(re.findall(r"\b(?:ld|st)\.global(?:\.[a-z0-9:]+)*\.v2\.(?:b64|u64|f64)", ptx)),
        tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        cp_async=len(re.findall(r"cp\.async\.c[ag]\.shared\.global", ptx)),
        i32_index_products=len(int32_index_products(compiled.asm["ttir"])),
    )


# The CUDA C++ sources, built as CMakeLists.txt builds them (ptxas warnings on spills / local memory are errors).
CSRC = Path(__file__).resolve().parent.parent / "csrc"


def cuda_build_settings() -> dict[str, str]:
    """csrc/cuda_build.json: the arch list and ptxas flags, the one source CMakeLists.txt and setup.py read."""
    return json.loads((CSRC / "cuda_build.json").read_text())


_SETTINGS = cuda_build_settings()
# {80: "sm_80", 90: "sm_90a"} from "80;90a"
CUDA_ARCHS = {int(a.rstrip("a")): f"sm_{a}" for a in _SETTINGS["archs"].split(";")}
PTXAS_FLAGS = f"-Xptxas={_SETTINGS['ptxas_flags']}"
_FUNC = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _short_name(mangled: str) -> str:
    """``r1k::(anonymous namespace)::kernel<(r1k::DType)2>(...)`` -> ``kernel<(r1k::DType)2>``."""
    filt = shutil.which("c++filt")
    name = subprocess.run([filt], input=mangled, capture_output=True, text=True).stdout.strip() if filt else mangled
    name = name.replace("(anonymous namespace)::", "")
    base = name.split("<", 1)[0].split("(", 1)[0].rsplit("::", 1)[-1]
    return base + (name[name.find("<") : name.find(">") + 1] if "<" in name else "")


def cuda_rows(nvcc: str | None = None) -> list[CompileRow]:
    """Compile every csrc/**/*.cu to a cubin per arch and read each kernel's resource usage."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None or not CSRC.is_dir():
        return []
    rows = []
    for src in sorted(CSRC.rglob("*.cu")):
        label = f"cuda:{src.relative_to(CSRC)}"
        for arch, sm in CUDA_ARCHS.items():
            with tempfile.TemporaryDirectory() as tmp:
                cubin = Path(tmp) / "k.cubin"
                cmd = [nvcc, "-cubin", f"-arch={sm}", "-std=c++17", "-O3", f"-I{CSRC}", PTXAS_FLAGS, "-o", str(cubin),
                       str(src)]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    lines = proc.stderr.strip().splitlines()
                    err = next((ln for ln in lines if "error" in ln), lines[-1] if lines else "nvcc failed")
                    rows.append(CompileRow(label, arch, "memory", 0, 0, 0, 0, "", 0, 0, 0, error=err))
                    continue
                res = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True)
                sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
            # the SASS dump is one section per kernel, each opened by "Function : <mangled name>"
            sections = dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S))
            for fn, regs, stack, shared, local in _FUNC.findall(res.stdout):
                code = sections.get(fn, "")
                vec = len(re.findall(r"\b(?:LDG|STG)\.E\.128\b|\bLDG\.E\.CONSTANT\.128\b", code))
                mma = "/".join(sorted(set(_MMA.findall(code)))) or "-"
                rows.append(CompileRow(f"{label}:{_short_name(fn)}", arch, "memory", int(regs), int(stack), int(local),
                                       int(shared), mma, 0, vec, 0))  # fmt: skip
    return rows


def check(row: CompileRow) -> list[str]:
    """Problems that make the compile check fail."""
    problems = []
    if row.error:
        return [f"does not compile: {row.error}"]
    if row.local > 0 or row.stack > 0:
        problems.append(f"uses local memory / stack ({row.local} / {row.stack} bytes): register spills")
    if row.shared > SHARED_LIMIT[row.arch]:
        problems.append(
            f"shared memory {row.shared} B over the {ARCH_NAMES[row.arch]} limit {SHARED_LIMIT[row.arch]} B"
        )
    if row.i32_index_products:
        problems.append(f"{row.i32_index_products} int32 index x stride products (offsets wrap past 2**31)")
    if row.registers > 255:
        problems.append(f"{row.registers} registers per thread")
    if row.kind == "matrix" and row.arch == 90 and (row.wgmma_ptx == 0 or "GMMA" not in row.mma):
        problems.append("matrix kernel without warpgroup MMA (wgmma / *GMMA) on sm_90a")
    return problems


def run(archs=ARCHS, name_filter: str = "") -> list[CompileRow]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            "the compile check cannot run in a process with TRITON_INTERPRET=1 (its kernels are "
            "interpreter functions); use run_in_subprocess() or the command line"
        )
    rows = []
    for arch in archs:
        for v in all_variants(arch):
            if name_filter in v.name:
                rows.append(analyse(v, arch))
    return rows


def format_table(rows: list[CompileRow], markdown: bool = False) -> str:
    head = ["kernel", "arch", "regs", "local", "stack", "smem B", "mma", "wgmma", "16B ld/st", "cp.async", "tma",
            "status"]  # fmt: skip
    body = []
    for r in rows:
        problems = check(r)
        cells = [r.name, ARCH_NAMES[r.arch], r.registers, r.local, r.stack, r.shared, r.mma, r.wgmma_ptx,
                 r.vec16_global, r.cp_async, r.tma, "; ".join(problems) or "ok"]  # fmt: skip
        body.append([str(c) for c in cells])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body])


def run_in_subprocess(archs=ARCHS, name_filter: str = "") -> list[CompileRow]:
    """``run()`` in a fresh interpreter-free Python process (usable from the interpreter test session)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "r1kernels.compile_report", "--json", str(out), "--filter", name_filter]
        for arch in archs:
            cmd += ["--arch", str(arch)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if not out.exists():
            raise RuntimeError(f"compile report failed:\n{proc.stdout}\n{proc.stderr}")
        return [CompileRow(**row) for row in json.loads(out.read_text())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="arch(s); default all")
    parser.add_argument("--filter", default="", help="only kernels whose name contains this")
    parser.add_argument("--markdown", type=Path, help="also write the table as markdown here")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--cuda", action="store_true", help="also build the CUDA C++ kernels with nvcc and report them")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or ARCHS)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    rows = run_in_subprocess(archs, args.filter) if interpreted else run(archs, args.filter)
    if args.cuda:
        rows += [r for r in cuda_rows() if r.arch in archs and args.filter in r.name]
    table = format_table(rows)
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(format_table(rows, markdown=True) + "\n")
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in rows]))
    failed = [r for r in rows if check(r)]
    print(f"\n{len(rows)} kernel builds, {len(failed)} with problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
