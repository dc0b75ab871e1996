"""The x86 instruction sets that decide how ONNX Runtime's int8 kernels compute.

ONNX Runtime (MLAS) picks its u8 x s8 dot-product kernel by CPUID: with VNNI (AVX-512 VNNI or
AVX-VNNI) products are summed in 32 bits; without it (SSE, AVX2, AVX-512 without VNNI) pairs are
summed in saturating 16 bits (`vpmaddubsw`), which clips large activations x weights. The same
int8 file can therefore agree with fp32 on one CPU and drift on another.

Read through CPUID (NumPy's runtime dispatch detection), not /proc/cpuinfo, which shows the
host's flags under emulation or some hypervisors. NumPy does not report AVX-VNNI or AMX; those
come from /proc/cpuinfo, and only when it agrees with CPUID on AVX-512 (a sign that it describes
the CPU this process runs on).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def features() -> dict[str, bool]:
    """Instruction sets relevant to int8 inference, by name."""
    try:
        from numpy.core._multiarray_umath import __cpu_features__ as cpuid
    except ImportError:  # NumPy 2 moved it
        from numpy._core._multiarray_umath import __cpu_features__ as cpuid
    out = {
        "AVX2": bool(cpuid.get("AVX2")),
        "AVX-512": bool(cpuid.get("AVX512F")),
        "AVX-512 VNNI": bool(cpuid.get("AVX512VNNI")),
        "AVX-VNNI": False,
        "AMX": False,
    }
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return out
    if ("avx512f" in flags) == out["AVX-512"]:
        out["AVX-VNNI"] = "avx_vnni" in flags
        out["AMX"] = "amx_int8" in flags
    return out


def has_vnni() -> bool:
    f = features()
    return f["AVX-512 VNNI"] or f["AVX-VNNI"]


def isa() -> str:
    """One line, e.g. "AVX2, no VNNI" or "AVX-512, AVX-512 VNNI, AMX"."""
    f = features()
    names = [k for k, v in f.items() if v and k != "AVX2"] or (["AVX2"] if f["AVX2"] else ["SSE"])
    return ", ".join(names) + ("" if has_vnni() else ", no VNNI")
