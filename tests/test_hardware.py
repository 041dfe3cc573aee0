"""Hardware detection and the compute-dtype decision (fake feature dicts; no timing)."""

from __future__ import annotations

import logging

import pytest

from sparseforge.errors import ConfigError
from sparseforge.hardware import autocast_mixed_precision, choose_compute_dtype, cpu_features, has_native_bf16

AVX2 = {"flags": ["avx", "avx2", "fma", "sse4_2"], "cuda": False}
AVX512_NO_BF16 = {"flags": ["avx", "avx2", "avx512f", "fma"], "cuda": False}
AVX512_BF16 = {"flags": ["avx2", "avx512_bf16", "avx512f", "fma"], "cuda": False}
AMX = {"flags": ["amx_bf16", "amx_tile", "avx2", "avx512f", "fma"], "cuda": False}
ARM_BF16 = {"flags": ["asimd", "bf16", "sve"], "cuda": False}
ARM_PLAIN = {"flags": ["asimd"], "cuda": False}
CUDA_BF16 = {"flags": ["avx2"], "cuda": True, "cuda_bf16": True}
CUDA_OLD = {"flags": ["avx2"], "cuda": True, "cuda_bf16": False}


def test_cpu_features_on_this_machine():
    f = cpu_features()
    assert isinstance(f["model_name"], str) and f["model_name"]
    assert isinstance(f["flags"], list) and f["flags"] == sorted(f["flags"]) and all(isinstance(x, str) for x in f["flags"])
    assert isinstance(f["native_bf16"], bool) and f["native_bf16"] == has_native_bf16(f["flags"])
    assert isinstance(f["threads"], int) and f["threads"] >= 1
    assert isinstance(f["torch"], str) and isinstance(f["cuda"], bool)


@pytest.mark.parametrize("flags, expected", [
    (AVX2["flags"], False), (AVX512_NO_BF16["flags"], False), (AVX512_BF16["flags"], True), (AMX["flags"], True),
    (ARM_BF16["flags"], True), (ARM_PLAIN["flags"], False), ([], False), (None, False),
])
def test_has_native_bf16(flags, expected):
    assert has_native_bf16(flags) is expected


@pytest.mark.parametrize("features, dtype", [
    (AVX2, "float32"), (AVX512_NO_BF16, "float32"), (AVX512_BF16, "bfloat16"), (AMX, "bfloat16"),
    (ARM_BF16, "bfloat16"), (ARM_PLAIN, "float32"), (CUDA_BF16, "bfloat16"), (CUDA_OLD, "float32"),
])
def test_auto_choice(features, dtype):
    chosen, reason = choose_compute_dtype("auto", features)
    assert chosen == dtype and reason
    assert autocast_mixed_precision("auto", features) == ("bf16" if dtype == "bfloat16" else "no")


def test_auto_reason_names_the_missing_feature():
    assert choose_compute_dtype("auto", AVX2)[1] == "AVX2 only: bf16 is emulated and slower, using float32"
    assert "AVX512_BF16" in choose_compute_dtype("auto", AVX512_NO_BF16)[1]
    assert "amx_bf16" in choose_compute_dtype("auto", AMX)[1]


def test_explicit_request_is_honoured_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sparseforge.hardware"):
        assert choose_compute_dtype("bfloat16", AVX2) == ("bfloat16", "requested")
    assert any("slower" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sparseforge.hardware"):
        assert choose_compute_dtype("bf16", AMX) == ("bfloat16", "requested")
        assert choose_compute_dtype("float32", AMX) == ("float32", "requested")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert autocast_mixed_precision("no", AMX) == "no"
    assert autocast_mixed_precision("bf16", AVX2) == "bf16"


def test_unknown_names():
    with pytest.raises(ConfigError, match="choose from auto, float32, bfloat16, float16"):
        choose_compute_dtype("int8", AVX2)
    with pytest.raises(ConfigError, match="choose from auto, no, bf16, fp16"):
        autocast_mixed_precision("fp8", AVX2)
