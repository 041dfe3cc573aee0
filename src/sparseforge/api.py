"""The Python API: the same nouns as the CLI."""

from __future__ import annotations

from .data import check_seq_len, fingerprint, load_windows
from .eval.perplexity import perplexity
from .models import get_adapter
from .oneshot.engine import OneShotConfig, OneShotReport, prune_model
from .oneshot.methods import get_method
from .sparsity.pattern import Pattern


def calibration_data(model, tokenizer, source: str = "wiki", n: int = 32, seq_len: int = 512, seed: int = 0,
                     text_field: str = "text"):
    """``n`` seeded calibration windows of ``seq_len`` tokens from the train split of ``source``."""
    check_seq_len(seq_len, get_adapter(model).context_length())
    return load_windows(tokenizer, source, "train", seq_len, n=n, seed=seed, text_field=text_field)


def prune(
    model,
    tokenizer=None,
    *,
    method: str = "sparsegpt",
    sparsity: float | None = None,
    pattern: str | None = None,
    calib: str = "wiki",
    n_calib: int = 32,
    seq_len: int = 512,
    seed: int = 0,
    calibration=None,
    text_field: str = "text",
    progress: bool = True,
    **options,
) -> OneShotReport:
    """Prune ``model`` in place. Give ``sparsity`` (fraction of zeros) or ``pattern`` ("2:4").

    ``calibration`` may hold ready (n, seq_len) token windows; otherwise they are
    drawn from ``calib``. Other keyword options are fields of OneShotConfig.
    """
    if sparsity is not None and pattern is not None:
        from .errors import ConfigError

        raise ConfigError("give either sparsity or pattern, not both")
    chosen = Pattern.parse(pattern if pattern is not None else (0.5 if sparsity is None else sparsity))
    config = OneShotConfig(method=method, pattern=chosen, **options)
    calibration_info = {}
    if get_method(method).stats_kind is not None:
        if calibration is None:
            calibration = calibration_data(model, tokenizer, calib, n_calib, seq_len, seed, text_field)
            calibration_info = {"source": calib, "seed": seed}
        calibration_info.update(
            n_windows=int(calibration.shape[0]), seq_len=int(calibration.shape[1]), fingerprint=fingerprint(calibration)
        )
    else:
        calibration = None
    report = prune_model(model, calibration, config, progress=progress)
    report.calibration = calibration_info
    return report


def evaluate(model, tokenizer, data: str = "wiki", seq_len: int = 512, max_windows: int | None = 40,
             batch_size: int = 1, text_field: str = "text", progress: bool = True) -> dict:
    """Perplexity on the held-out split of ``data`` (the first ``max_windows`` windows; None = all)."""
    check_seq_len(seq_len, get_adapter(model).context_length())
    windows = load_windows(tokenizer, data, "eval", seq_len, n=max_windows, text_field=text_field)
    result = perplexity(model, windows, batch_size=batch_size, progress=progress)
    result.update(data=data, fingerprint=fingerprint(windows))
    return result
