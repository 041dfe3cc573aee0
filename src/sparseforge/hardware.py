"""What this machine can compute fast: detected, never assumed.

CPUs differ in ways that flip the right compute dtype. With AVX-512 BF16 or AMX
a bfloat16 matmul runs several times faster than float32; with AVX2 only,
bfloat16 is emulated and runs many times *slower*. ``choose_compute_dtype``
decides from the detected features and says why.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from .errors import ConfigError
from .options import COMPUTE_DTYPES, MIXED_PRECISION

log = logging.getLogger(__name__)

#: cpuinfo flags worth reporting: vector width, fused multiply-add, low-precision dot products
RELEVANT_FLAGS = frozenset({
    # x86
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
    # aarch64
    "asimd", "asimdhp", "asimddp", "fphp", "sve", "sve2", "bf16", "svebf16", "i8mm",
})
#: flags meaning bfloat16 arithmetic runs in hardware (x86: AVX-512 BF16 or AMX; aarch64: FEAT_BF16)
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
#: flags meaning float16 arithmetic runs in hardware on a CPU
FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16", "asimdhp"})

DTYPE_CHOICES = COMPUTE_DTYPES
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
#: what torch.backends.cpu.get_cpu_capability() implies when /proc/cpuinfo is unavailable
_CAPABILITY_FLAGS = {"AVX2": ["avx", "avx2", "fma"], "AVX512": ["avx", "avx2", "fma", "avx512f"]}

#: the trainer's mixed-precision mode of each compute dtype (float32: none)
AUTOCAST_MODES = {"bfloat16": "bf16", "float16": "fp16"}

def _torch_capability() -> str | None:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch or an exotic build
        return None


def _read_cpuinfo() -> tuple[str | None, set[str]]:
    """(model name, all flags) of the first processor in /proc/cpuinfo; (None, empty) where it is missing."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None, set()
    name, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and name is None:
            name = value.strip() or None
        elif key in ("flags", "features") and not flags:  # x86 says "flags", aarch64 "Features"
            flags = set(value.split())
    return name, flags


def _darwin_flags() -> set[str]:
    """Apple Silicon reports FEAT_BF16 through sysctl, not /proc/cpuinfo."""
    try:
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5)
        return {"bf16"} if out.stdout.strip() == "1" else set()
    except (OSError, subprocess.SubprocessError):
        return set()


def cpu_features() -> dict:
    """The CPU's relevant instruction-set flags and the torch runtime, as a JSON-able dict. Never raises."""
    name, flags, source = None, set(), "none"
    try:
        name, flags = _read_cpuinfo()
        if flags:
            source = "/proc/cpuinfo"
        elif sys.platform == "darwin":
            flags, source = _darwin_flags(), "sysctl"
    except Exception as e:  # never fail: the caller falls back to float32
        log.debug("reading CPU flags failed: %s", e)
    capability = _torch_capability()
    if not flags and capability in _CAPABILITY_FLAGS:
        flags, source = set(_CAPABILITY_FLAGS[capability]), "torch"
    relevant = sorted(flags & RELEVANT_FLAGS)
    try:
        cuda = bool(torch.cuda.is_available())
        cuda_bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    except Exception:
        cuda, cuda_bf16 = False, False
    return {
        "model_name": name or platform.processor() or platform.machine() or "unknown",
        "arch": platform.machine(),
        "flags": relevant,
        "flags_source": source,
        "torch_capability": capability,
        "native_bf16": has_native_bf16(relevant),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": cuda,
        "cuda_bf16": cuda_bf16,
    }


def has_native_bf16(flags) -> bool:
    """True when bfloat16 arithmetic runs in hardware: avx512_bf16 or amx_bf16 (x86), bf16 (aarch64)."""
    return bool(BF16_FLAGS & set(flags or ()))


def _normalise(requested: str) -> str:
    name = str(requested).strip().lower()
    name = _ALIASES.get(name, name)
    if name not in DTYPE_CHOICES:
        raise ConfigError(f"compute dtype '{requested}' unknown: choose from {', '.join(DTYPE_CHOICES)} (or bf16, fp16, fp32)")
    return name


def _missing_bf16_reason(flags: set[str]) -> str:
    if "avx512f" in flags:
        return "AVX-512 without AVX512_BF16/AMX: bf16 is emulated and slower, using float32"
    if "avx2" in flags:
        return "AVX2 only: bf16 is emulated and slower, using float32"
    if "asimd" in flags or "sve" in flags:
        return "ARM CPU without the bf16 feature: bf16 is emulated and slower, using float32"
    return "no native bf16 instructions detected: bf16 would be emulated and slower, using float32"


def choose_compute_dtype(requested: str = "auto", features: dict | None = None) -> tuple[str, str]:
    """``(dtype name, reason)``: "float32", "bfloat16" or "float16" for this machine.

    ``auto`` picks bfloat16 on a CUDA GPU that supports it or on a CPU with native
    bf16, float32 otherwise. An explicit request is honoured; asking for a
    low-precision dtype the CPU only emulates logs a warning.
    """
    name = _normalise(requested)
    features = cpu_features() if features is None else features
    flags = set(features.get("flags") or ())
    cpu_bf16 = has_native_bf16(flags) or bool(features.get("native_bf16"))
    gpu_bf16 = bool(features.get("cuda") and features.get("cuda_bf16"))
    if name == "auto":
        if gpu_bf16:
            return "bfloat16", "CUDA GPU with bf16 support"
        if cpu_bf16:
            found = ", ".join(sorted(flags & BF16_FLAGS)) or "bf16"
            return "bfloat16", f"CPU with native bf16 ({found})"
        if features.get("cuda"):
            return "float32", "CUDA GPU without bf16 support and no native bf16 on the CPU: using float32"
        return "float32", _missing_bf16_reason(flags)
    if not features.get("cuda"):
        if name == "bfloat16" and not cpu_bf16:
            log.warning("bfloat16 requested but this CPU has no native bf16 (%s): it will be emulated and slower than float32",
                        ", ".join(sorted(flags)) or "no flags found")
        elif name == "float16" and not FP16_FLAGS & flags:
            log.warning("float16 requested but this CPU has no native fp16 arithmetic: it will be emulated and slower than float32")
    elif name == "bfloat16" and not gpu_bf16 and not cpu_bf16:
        log.warning("bfloat16 requested but neither the GPU nor the CPU supports it natively: it will be slow")
    return name, "requested"


def autocast_mixed_precision(requested: str = "auto", features: dict | None = None) -> str:
    """The trainer's ``mixed_precision`` for this machine: "bf16" or "no" (an explicit "fp16" is passed through).

    Accepts the trainer's names (auto, no, bf16, fp16) and the dtype names of ``choose_compute_dtype``.
    """
    name = str(requested).strip().lower()
    if name == "no":
        name = "float32"
    try:
        dtype, _ = choose_compute_dtype(name, features)
    except ConfigError:
        choices = ", ".join(("auto", *MIXED_PRECISION))
        raise ConfigError(f"mixed precision '{requested}' unknown: choose from {choices}") from None
    return AUTOCAST_MODES.get(dtype, "no")


__all__ = [
    "AUTOCAST_MODES",
    "DTYPE_CHOICES",
    "autocast_mixed_precision",
    "choose_compute_dtype",
    "cpu_features",
    "has_native_bf16",
]
