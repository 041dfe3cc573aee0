"""Zero-shot tasks of lm-evaluation-harness on a model already loaded by sparseforge.

The model is handed to lm-eval as an object (``HFLM(pretrained=model)``), so every model
``load_model`` reads works, compact LoSparse/TranSpa ones included. lm-eval never
downloads here: its tasks read their datasets from the local Hugging Face cache, and the
built-in ``sparseforge_wiki`` (eval/wiki_task.py) is made from the embedded Wikipedia text.

Scores come back as ``{task: {metric: value, metric + "_stderr": value, "n": examples}}``.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError, DataError, first_line
from .wiki_task import TASK_NAME as WIKI_TASK

log = logging.getLogger(__name__)

NOT_INSTALLED = "zero-shot tasks need lm-evaluation-harness: pip install 'sparseforge[eval]'"
#: the tasks sparseforge ships (YAML in lm_tasks/), runnable without any download
BUILTIN_TASKS = (WIKI_TASK,)
TASKS_DIR = Path(__file__).with_name("lm_tasks")
#: the environment variables that keep datasets and huggingface_hub off the network
OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def require_lm_eval():
    """The lm_eval module, or a one-line ConfigError naming the extra to install."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(NOT_INSTALLED) from None
    return lm_eval


def parse_task_list(text: str) -> list[str]:
    """'a, b,a' -> ['a', 'b']: comma-separated names, in order, each once."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise ConfigError(f"--tasks '{text}' names no task: give comma-separated names, e.g. {WIKI_TASK}")
    return names


def task_manager(names: list[str]):
    """lm-eval's TaskManager that knows sparseforge's tasks; lm-eval's own (~15,000, slow to index) only when needed."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    builtin_only = all(name in BUILTIN_TASKS for name in names)
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=not builtin_only)


def check_task_names(names: list[str], known) -> None:
    """ConfigError for the names not in ``known``, with the closest known names as suggestions."""
    known = list(known)
    unknown = [name for name in names if name not in known]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hints.append(f"'{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    raise ConfigError(f"unknown task {'; '.join(hints)}: see `lm_eval ls tasks`, or use {WIKI_TASK} (built in)")


@contextmanager
def offline():
    """No network for datasets and huggingface_hub inside: both read their switches at import, so set those too."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved_env = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    saved = (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    os.environ.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _quiet_lm_eval():
    """lm-eval's log (task listings; warnings that a model object skips its loading options) only when debugging."""
    lm_eval_log = logging.getLogger("lm_eval")
    previous = lm_eval_log.level
    if log.getEffectiveLevel() > logging.DEBUG:
        lm_eval_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lm_eval_log.setLevel(previous)


def _missing_data_error(name: str, error: BaseException) -> DataError:
    import datasets.config

    found = re.search(r"'([^'\s]+)'", str(error))  # datasets names the hub id it could not reach
    dataset = f" ({found.group(1)})" if found else ""
    log.debug("task %s: %s", name, first_line(error))
    return DataError(f"task {name} needs its dataset{dataset}, which is not in the local cache ({datasets.config.HF_DATASETS_CACHE}): "
                     f"run once with internet or use --tasks {WIKI_TASK}")


def prepare_tasks(names: list[str]):
    """The TaskManager for ``names`` once every name is known and every task's data loads offline (before any model)."""
    manager = task_manager(names)
    check_task_names(names, manager.all_tasks)
    from lm_eval.tasks import get_task_dict

    with offline(), _quiet_lm_eval():
        for name in names:
            try:
                get_task_dict([name], manager)
            except OSError as e:  # datasets' ConnectionError, FileNotFoundError and DatasetNotFoundError
                raise _missing_data_error(name, e) from None
    return manager


def _scores(results: dict) -> dict[str, dict]:
    """lm-eval's ``{"acc,none": ..., "acc_stderr,none": ...}`` per task -> ``{"acc": ..., "acc_stderr": ..., "n": ...}``.

    A metric computed under a filter other than "none" keeps it: ``exact_match[strict-match]``.
    A stderr lm-eval did not compute ("N/A") is None.
    """
    scores = {}
    for task, row in results["results"].items():
        entry = {}
        for key, value in row.items():
            if "," not in key:
                continue  # alias, name, sample_len
            metric, kind = key.split(",", 1)
            name = metric if kind == "none" else f"{metric}[{kind}]"
            entry[name] = float(value) if isinstance(value, (int, float)) else None
        samples = results.get("n-samples", {}).get(task)
        if samples:
            entry["n"] = int(samples["effective"])
        scores[task] = entry
    return scores


def run_tasks(model, tokenizer, names: list[str], limit: int | None = None, batch_size: int = 1, manager=None) -> dict:
    """Scores of a loaded causal LM on lm-eval tasks, zero-shot: ``{"tasks": {task: {metric: value}}, ...}``.

    ``limit``: the first N examples of each task (all when None). ``manager`` from
    :func:`prepare_tasks` (made here when not given).
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be at least 1")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be at least 1")
    manager = manager or prepare_tasks(names)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    started = time.perf_counter()
    with offline(), _quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
        results = simple_evaluate(model=lm, tasks=list(names), task_manager=manager, limit=limit, num_fewshot=0,
                                  log_samples=False)
    return {"tasks": _scores(results), "limit": limit, "num_fewshot": 0, "lm_eval_version": results.get("lm_eval_version"),
            "seconds": time.perf_counter() - started}


def format_table(tasks: dict[str, dict]) -> str:
    """One line per task and metric: value and standard error."""
    lines = [f"{'task':<28} {'metric':<24} {'value':>8} {'stderr':>8} {'n':>6}"]
    for task, entry in tasks.items():
        for metric, value in entry.items():
            if metric == "n" or metric.endswith("_stderr") or "_stderr[" in metric:
                continue
            stderr = entry.get(metric.replace("[", "_stderr[", 1) if "[" in metric else f"{metric}_stderr")
            lines.append(f"{task:<28} {metric:<24} {_number(value):>8} {_number(stderr):>8} {entry.get('n', ''):>6}")
    return "\n".join(lines)


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"
