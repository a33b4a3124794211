"""E4M3 encoding shared by the FP8 kernels: DeepSeek-V3's scale rule and a software encoder / decoder.

The scale rule is ``scale = max(amax, 1e-4) / 448``, optionally rounded up to a power of two (UE8M0).
sm_80 has no FP8 conversion instruction (Triton rejects fp8e4nv there), so the kernels carry a software
encoder / decoder (HW_CVT=False) that rounds to nearest even like ``cvt.rn.satfinite``; it mirrors
``csrc/common/e4m3.h`` bit for bit. sm_89+ uses the hardware conversion (HW_CVT=True).
"""

from __future__ import annotations

import triton
import triton.language as tl

E4M3_MAX: tl.constexpr = tl.constexpr(448.0)
MIN_AMAX: tl.constexpr = tl.constexpr(1e-4)  # an all-zero tile gets scale 1e-4 / 448, never 0 (no NaN)
_SUBNORMAL_LIMIT: tl.constexpr = tl.constexpr(0.015625)  # 2^-6, the smallest normal e4m3 magnitude


def hw_fp8_convert(arch: int | None) -> bool:
    """Hardware FP8 conversion exists from sm_89 on; the interpreter (arch None) emulates it."""
    return arch is None or arch >= 89


@triton.jit
def e4m3_bits_software(v):
    """fp32 -> e4m3fn bit pattern (uint8), round to nearest even, saturating at 448, NaN -> NaN."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.minimum(tl.abs(v), E4M3_MAX)
    ab = a.to(tl.int32, bitcast=True)
    normal = ((ab + 0x7FFFF + ((ab >> 20) & 1)) >> 20) - 960  # RNE to 3 mantissa bits, rebias 127 -> 7
    # below 2^-6 the code is a / 2^-9 rounded to nearest even: adding and removing 2^23 does exactly that
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a < _SUBNORMAL_LIMIT, sub, normal)
    code = tl.where(v != v, 0x7F, code)
    return (code | sign).to(tl.uint8)


@triton.jit
def e4m3_value_software(q):
    """e4m3fn bit pattern (uint8) -> fp32, exact."""
    c = q.to(tl.int32)
    e = (c >> 3) & 0xF
    m = c & 0x7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    mag = tl.where((c & 0x7F) == 0x7F, float("nan"), mag)
    return tl.where((c & 0x80) != 0, -mag, mag)


@triton.jit
def tile_scale(amax, has_nan, POW2: tl.constexpr):
    """DeepSeek-V3 scale from a tile's |x| max; NaN in the tile gives a NaN scale (propagates)."""
    s = tl.math.div_rn(tl.maximum(amax, MIN_AMAX), E4M3_MAX)
    if POW2:
        s_bits = s.to(tl.int32, bitcast=True)
        s = tl.where(s_bits >= 0x7F800000, s, ((s_bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True))
    return tl.where(has_nan, float("nan"), s)
