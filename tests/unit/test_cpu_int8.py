"""Which CPUs need 7-bit int8 weights, and 7-bit item rows."""

from __future__ import annotations

import numpy as np
import pytest

from compression.quantize.cpu_int8 import cpu_summary, u8s8_saturates, x86_flags
from compression.quantize.item_matrix import quantize_rows

AVX2_EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
VNNI_XEON = "processor\t: 0\nflags\t\t: avx2 avx512f avx512bw avx512_vnni\n"


def test_flags_come_from_the_first_flags_line() -> None:
    assert x86_flags(AVX2_EPYC) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert x86_flags("processor: 0\n") == frozenset()


@pytest.mark.parametrize(
    ("machine", "flags", "saturates"),
    [
        ("x86_64", x86_flags(AVX2_EPYC), True),  # vpmaddubsw: int16 pairs overflow
        ("x86_64", x86_flags(VNNI_XEON), False),
        ("x86_64", frozenset({"avx2", "avx_vnni"}), False),  # Alder Lake style AVX-VNNI
        ("AMD64", None, True),  # flags unknown: the 7-bit model is right everywhere
        ("aarch64", None, False),
        ("arm64", frozenset(), False),
    ],
)
def test_saturation_rule(machine: str, flags: frozenset[str] | None, saturates: bool) -> None:
    assert u8s8_saturates(machine, flags) is saturates


def test_seven_bit_rows_fit_the_unsaturated_range() -> None:
    m = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    m[0] = 0
    # 7 bits: 2 x 255 x 63 = 32,130 fits the int16 pair sum of vpmaddubsw
    for bits, qmax in [(8, 127), (7, 63)]:
        q, scale = quantize_rows(m, bits)
        assert np.abs(q[1:]).max(axis=1).tolist() == [qmax] * 49  # each row uses its range
        err = np.abs(q * scale[:, None] - m)
        assert (err <= scale[:, None] / 2 + 1e-6).all()
        assert scale[0] == 1.0 and not q[0].any()
    with pytest.raises(ValueError, match="bits=6"):
        quantize_rows(m, 6)


def test_cpu_summary_names_the_model_and_the_flags_that_change_results() -> None:
    assert cpu_summary(AVX2_EPYC) == {"model": "AMD EPYC", "flags": ["avx2"]}
    xeon = cpu_summary(VNNI_XEON)
    assert xeon["flags"] == ["avx2", "avx512f", "avx512_vnni"] and xeon["model"]
