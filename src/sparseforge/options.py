"""The values each enumerated option accepts, in one torch-free place: the library validates against these tuples
and the CLI offers them as its ``choices`` without importing the modules (and torch) that use them."""

from __future__ import annotations

TASKS = ("lm", "classify")
#: dtypes a model is loaded or saved in
DTYPES = ("float32", "float16", "bfloat16")
#: the one-shot engine's compute dtype ("auto": bf16 where the CPU or GPU has it natively)
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
#: the one-shot engine: the next block sees the pruned block's outputs (the papers') or the dense ones
PROPAGATE = ("pruned", "dense")
LR_SCHEDULES = ("cosine", "linear", "constant")
MIXED_PRECISION = ("no", "bf16", "fp16")
#: LoSparse / ITP: whether a pruned row of S stays zero or keeps training between maskings (the reference's)
PRUNED_ROWS = ("stay", "train")
#: low-rank methods' saved model: the compact factors or merged plain weights
LOWRANK_EXPORTS = ("compact", "dense")
#: TranSpa-family options
LAYOUTS = ("uniform", "free")
SHRINK_SCHEDULES = ("theta", "linear")
COUPLE_SCORES = ("fisher", "magnitude")
UNIT_SCORES = ("activation", "l1")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
