"""Whether this CPU's u8 x s8 int8 products can overflow (and so need 7-bit weights)."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# The flags that change this project's numbers: bf16 training speed, int8 kernels.
RESULT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def x86_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first CPU in a /proc/cpuinfo text (empty if none listed)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def u8s8_saturates(machine: str, flags: frozenset[str] | None) -> bool:
    """True where ONNX Runtime's u8 x s8 kernels may saturate.

    Without VNNI, MLAS multiplies with AVX2 `vpmaddubsw`, which adds two u8 x s8 products into
    an int16: 2 x 255 x 127 = 64,770 overflows 32,767. ONNX Runtime's advice is 7-bit
    weights (`reduce_range`): 2 x 255 x 63 = 32,130 fits. VNNI (`vpdpbusd`) accumulates in
    int32 and never saturates; ARM's dot-product kernels do not either. `flags=None`
    (unknown x86 flags, e.g. not Linux) counts as saturating: a 7-bit model is right
    everywhere.

    Where it matters (AVX2-only EPYC, `benchmarks/int8_saturation.py`): the int8 item rows'
    QGemm (the output product over the whole catalogue) moved the ML-1M teacher's scores by
    up to 2.36 with 8-bit rows, 0.22 with 7-bit; top-10 agreement 0.970 vs 0.979. The block
    MatMuls of ORT's quantizers lost more to the 7th bit than to saturation.
    """
    if machine.lower() not in {"x86_64", "amd64", "i386", "i686", "x86"}:
        return False
    return flags is None or not (flags & VNNI_FLAGS)


@cache
def int8_needs_reduce_range() -> bool:
    """`u8s8_saturates` for the CPU this process runs on."""
    info = Path("/proc/cpuinfo")
    flags = x86_flags(info.read_text()) if info.is_file() else None
    return u8s8_saturates(platform.machine(), flags or None)


def cpu_summary(cpuinfo: str | None = None) -> dict[str, object]:
    """The CPU model and which of `RESULT_FLAGS` it has, for result reports (the machine
    kind varies between runs; AVX-512 BF16 and VNNI change timings and int8 scores)."""
    if cpuinfo is None:
        info = Path("/proc/cpuinfo")
        cpuinfo = info.read_text() if info.is_file() else ""
    model = next(
        (line.partition(":")[2].strip() for line in cpuinfo.splitlines()
         if line.partition(":")[0].strip() == "model name"),
        platform.processor() or platform.machine(),
    )  # fmt: skip
    flags = x86_flags(cpuinfo)
    return {"model": model, "flags": [f for f in RESULT_FLAGS if f in flags]}
