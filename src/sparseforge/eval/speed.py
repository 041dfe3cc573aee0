"""Speed (METHODS.md section 8): prefill and decode tokens/s, warm, medians of interleaved repeats.

Every measured round runs every model once (A B C A B C ...), so a slow phase of
the machine (another process, thermal throttling) hits all models alike instead
of one. The first model is the baseline of the speed-ups.

Peak memory needs a fresh process per model (the peak RSS of a process only
grows): ``measure_peak_memory`` runs this module as a child,
``python -m sparseforge.eval.speed --memory-probe SOURCE``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import hardware
from ..errors import ConfigError, ModelError, SparseforgeError

log = logging.getLogger(__name__)

NOTE = "a zero-filled (unstructured) sparse model runs at dense speed; only physically smaller models are faster"


@dataclass
class SpeedConfig:
    prefill_tokens: int = 512  # context length of the prefill measurement (last-token logits only)
    decode_tokens: int = 64  # new tokens generated with the KV cache after a context of `context` tokens
    context: int = 512
    batch_size: int = 1
    repeats: int = 5  # measured rounds; every round runs every model once (interleaved)
    warmup: int = 1  # unmeasured rounds first
    threads: int | None = None  # torch.set_num_threads for the run (None: leave as is)
    seed: int = 0

    def __post_init__(self):
        for name in ("prefill_tokens", "decode_tokens", "context", "batch_size", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"speed {name} must be a positive integer, got {value!r}: pass e.g. {name}={getattr(SpeedConfig, name)}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"speed warmup must be an integer >= 0, got {self.warmup!r}: pass e.g. warmup=1")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"speed threads must be a positive integer or None, got {self.threads!r}: pass e.g. threads={os.cpu_count()}")


# ---------------------------------------------------------------- model introspection


def _forward_params(model: nn.Module) -> set[str]:
    """Parameter names the forward declares explicitly (not swallowed by **kwargs)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def is_causal_lm(model: nn.Module) -> bool:
    """A causal LM with a KV cache (decoder) rather than an encoder: the class or the config says so."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    head = name.endswith(("ForCausalLM", "LMHeadModel"))
    if name.startswith(("Bert", "Roberta", "XLMRoberta", "Electra")) and not getattr(config, "is_decoder", False):
        head = False  # BertLMHeadModel is only causal with is_decoder=True
    return (head or bool(getattr(config, "is_decoder", False))) and cache_argument(model) is not None


def cache_argument(model: nn.Module) -> str | None:
    """The forward's KV-cache argument: ``cache`` since transformers 5.25, ``past_key_values`` before."""
    params = _forward_params(model)
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def vocab_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if not size:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        size = getattr(embeddings, "num_embeddings", None)
    if not size:
        raise ModelError(f"{type(model).__name__} has no config.vocab_size nor input embeddings: speed needs token ids to feed it")
    return int(size)


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def parameter_bytes(model: nn.Module) -> dict:
    """Parameter count and bytes of parameters + persistent buffers; tied (shared) tensors counted once."""
    seen: set = set()

    def first_time(t: torch.Tensor) -> bool:
        key = (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.device.type != "meta" else id(t)
        if key in seen:
            return False
        seen.add(key)
        return True

    count = size = 0
    for p in model.parameters():  # already unique by object; the storage key also catches distinct tied views
        if first_time(p):
            count += p.numel()
            size += p.numel() * p.element_size()
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set and first_time(buf):
                size += buf.numel() * buf.element_size()
    return {"parameters": int(count), "bytes": int(size)}


def _dtype_of(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return str(p.dtype).replace("torch.", "") if p is not None else "unknown"


# ---------------------------------------------------------------- single measurements


def prefill_seconds(model: nn.Module, input_ids: torch.Tensor) -> float:
    """One timed no-grad forward over ``input_ids``; a causal LM computes the last position's logits only."""
    params = _forward_params(model)
    kwargs = {}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1  # the LM head (49152 x 576 on SmolLM2) runs on one token, as in generation
    if "use_cache" in params:
        kwargs["use_cache"] = False
    with torch.no_grad():
        start = time.perf_counter()
        model(input_ids=input_ids, **kwargs)
        return time.perf_counter() - start


def greedy_decode(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Prefill ``input_ids`` (not timed), then ``new_tokens`` timed greedy steps, each feeding one token with the KV cache.

    Returns the greedy tokens, ``(batch, new_tokens + 1)`` (the prefill's prediction, then one per
    step), and the seconds of the steps. A hand loop rather than ``generate()``: it needs only a
    forward taking a KV cache, so it runs on models whose modules were replaced.
    """
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(model) else {}
    argument = cache_argument(model) or "past_key_values"
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True, **kwargs)
        cache = returned_cache(out)
        if cache is None:
            raise ModelError(f"{type(model).__name__} returned no KV cache with use_cache=True: decode speed needs one")
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens = [token]
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **{argument: cache})
            cache = returned_cache(out)
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens.append(token)
        seconds = time.perf_counter() - start
    return torch.cat(tokens, dim=1), seconds


def decode_seconds(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds of ``new_tokens`` cached greedy steps after an untimed prefill of ``input_ids``."""
    return greedy_decode(model, input_ids, new_tokens)[1]


# ---------------------------------------------------------------- the benchmark


def _check_lengths(label: str, model: nn.Module, causal: bool, config: SpeedConfig) -> None:
    limit = max_positions(model)
    if limit is None:
        return
    if config.prefill_tokens > limit:
        raise ConfigError(f"prefill_tokens {config.prefill_tokens} exceeds model '{label}' maximum of {limit} positions: "
                          f"lower prefill_tokens to <= {limit}")
    if causal and config.context + config.decode_tokens > limit:
        raise ConfigError(f"context + decode_tokens = {config.context + config.decode_tokens} exceeds model '{label}' maximum "
                          f"of {limit} positions: lower context or decode_tokens")


def _token_ids(vocab: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Random ids from a generator seeded by ``seed`` only: every model with this vocab size gets the same ids."""
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def load_average() -> float | None:
    """1-minute load average of the machine (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _median_rate(tokens: int, seconds: list[float]) -> float | None:
    if not seconds:
        return None
    return tokens / statistics.median(seconds)


def benchmark_speed(models: list[tuple[str, nn.Module]], config: SpeedConfig | None = None, progress: bool = True) -> dict:
    """Prefill and decode tokens/s of each ``(label, model)``, measured interleaved; speed-ups vs the first model.

    Encoders (no causal LM head) get prefill only (one forward of batch x prefill_tokens) and decode None.
    """
    config = config or SpeedConfig()
    if not models:
        raise ConfigError("benchmark_speed needs at least one (label, model) pair: the first one is the baseline")
    labels = [label for label, _ in models]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"benchmark labels must be unique, got {labels}: give each model its own label")

    b = config.batch_size
    entries = []
    for label, model in models:
        causal = is_causal_lm(model)
        _check_lengths(label, model, causal, config)
        vocab = vocab_size(model)
        entries.append({
            "label": label, "model": model, "causal": causal, "was_training": model.training,
            "prefill_ids": _token_ids(vocab, (b, config.prefill_tokens), config.seed),
            "context_ids": _token_ids(vocab, (b, config.context), config.seed + 1) if causal else None,
            "prefill": [], "decode": [],
        })
    schedule = []
    rounds = config.warmup + config.repeats
    old_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    load_before = load_average()
    cores = os.cpu_count() or 1
    if load_before is not None and load_before >= cores:
        log.warning("machine busy before the speed run (load %.1f on %d cores): timings will be contended; "
                    "rerun on an idle machine or with fewer threads", load_before, cores)
    try:
        for e in entries:
            e["model"].eval()
        with tqdm(total=rounds * len(entries), desc="speed", disable=not progress) as bar:
            for r in range(rounds):
                measured = r >= config.warmup
                for e in entries:  # one model after another in every round: A B C A B C ...
                    schedule.append({"round": r, "label": e["label"], "warmup": not measured})
                    seconds = prefill_seconds(e["model"], e["prefill_ids"])
                    if measured:
                        e["prefill"].append(seconds)
                    if e["causal"]:
                        seconds = decode_seconds(e["model"], e["context_ids"], config.decode_tokens)
                        if measured:
                            e["decode"].append(seconds)
                    bar.update(1)
                if measured:
                    log.info("speed round %d/%d: %s", r - config.warmup + 1, config.repeats, ", ".join(
                        f"{e['label']} prefill {e['prefill'][-1]:.3f}s" + (f" decode {e['decode'][-1]:.3f}s" if e["decode"] else "")
                        for e in entries))
        machine = hardware.cpu_features()
    finally:
        for e in entries:
            e["model"].train(e["was_training"])
        if config.threads is not None:
            torch.set_num_threads(old_threads)

    results = []
    for e in entries:
        results.append({
            "label": e["label"],
            "kind": "causal" if e["causal"] else "encoder",
            **parameter_bytes(e["model"]),
            "prefill_tokens_per_s": _median_rate(b * config.prefill_tokens, e["prefill"]),
            "prefill_seconds": [round(s, 6) for s in e["prefill"]],
            "decode_tokens_per_s": _median_rate(b * config.decode_tokens, e["decode"]) if e["causal"] else None,
            "decode_seconds": [round(s, 6) for s in e["decode"]] if e["causal"] else None,
        })
    base = results[0]
    for res in results:
        for phase in ("prefill", "decode"):
            mine, theirs = res[f"{phase}_tokens_per_s"], base[f"{phase}_tokens_per_s"]
            res[f"speedup_{phase}"] = mine / theirs if mine is not None and theirs else None
    recommended, reason = hardware.choose_compute_dtype("auto", machine)
    note = (f"prefill: batch {b} x {config.prefill_tokens} tokens, last-token logits; decode: {config.decode_tokens} greedy tokens "
            f"with the KV cache after {config.context} context tokens; medians of {config.repeats} interleaved rounds after "
            f"{config.warmup} warm-up round(s); speed-ups vs '{base['label']}'. Note: {NOTE}.")
    log.info("speed: %s", "; ".join(f"{r['label']} prefill x{r['speedup_prefill']:.2f}" for r in results))
    return {
        "config": asdict(config),
        "machine": machine,
        "dtype": {e["label"]: _dtype_of(e["model"]) for e in entries},
        "recommended_dtype": {"dtype": recommended, "reason": reason},
        "models": results,
        "schedule": schedule,
        "load_average": {"before": load_before, "after": load_average()},
        "note": note,
    }


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def format_speed_table(result: dict) -> str:
    """Plain-text table of a ``benchmark_speed`` result (a "peak MiB" column when models carry ``peak_rss_mb``)."""
    with_peak = any(m.get("peak_rss_mb") is not None for m in result["models"])
    header = ["model", "params (M)", "MB", "prefill tok/s", "decode tok/s", "prefill x", "decode x"] + (["peak MiB"] if with_peak else [])
    rows = []
    for m in result["models"]:
        row = [
            str(m["label"]),
            _fmt(m["parameters"] / 1e6, ".2f"),
            _fmt(m["bytes"] / 1e6, ".1f"),
            _fmt(m["prefill_tokens_per_s"], ".1f"),
            _fmt(m["decode_tokens_per_s"], ".1f"),
            _fmt(m.get("speedup_prefill"), ".2f"),
            _fmt(m.get("speedup_decode"), ".2f"),
        ]
        if with_peak:
            row.append(_fmt(m.get("peak_rss_mb"), ".0f"))
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# ---------------------------------------------------------------- peak memory, one child process per model


def measure_peak_memory(model_source: str | os.PathLike | None, config: SpeedConfig | None = None, timeout: float | None = None) -> dict:
    """Peak RSS of loading ``model_source`` and running one prefill and one decode, in a fresh child process.

    ``model_source`` is anything ``sparseforge.loading.load_model`` takes (None: the embedded default).
    Returns ``{"source", "rss_before_load_mb", "rss_after_load_mb", "peak_rss_mb", ...}`` in MiB; the
    peak is the child's own (VmHWM), which includes the ~250 MiB of importing torch and transformers.
    """
    config = config or SpeedConfig()
    source = "default" if model_source is None else str(model_source)
    cmd = [sys.executable, "-m", "sparseforge.eval.speed", "--memory-probe", source,
           "--prefill-tokens", str(config.prefill_tokens), "--decode-tokens", str(config.decode_tokens),
           "--context", str(config.context), "--batch-size", str(config.batch_size), "--seed", str(config.seed)]
    if config.threads is not None:
        cmd += ["--threads", str(config.threads)]
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # the directory holding sparseforge/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    log.info("memory probe: %s", source)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ModelError(f"memory probe for {source} took longer than {timeout}s: raise the timeout or use a smaller config") from None
    if proc.returncode != 0:
        lines = [s for s in proc.stderr.strip().splitlines() if s.strip()]
        raise ModelError(f"memory probe for {source} failed: {lines[-1].strip() if lines else f'exit code {proc.returncode}'}")
    for out_line in reversed(proc.stdout.strip().splitlines()):
        if out_line.startswith("{"):
            try:
                return {"source": source, **json.loads(out_line)}
            except json.JSONDecodeError:
                break
    raise ModelError(f"memory probe for {source} printed no JSON result: run `{' '.join(cmd)}` to see why")


def own_peak_rss_mb() -> float:
    """Peak resident memory of this process's own address space, in MiB.

    ``ru_maxrss`` is not that in a child: Linux carries the parent's peak over the
    fork/exec (a 1.4 GiB parent gives every child a "peak" of 1.4 GiB). ``VmHWM``
    in /proc/self/status belongs to the new address space only; other systems fall
    back to ``measure.peak_rss_mb``.
    """
    from ..measure import peak_rss_mb

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return peak_rss_mb()


def _memory_probe(args: argparse.Namespace) -> dict:
    from ..loading import load_model
    from ..measure import current_rss_mb, peak_rss_mb

    if args.threads:
        torch.set_num_threads(args.threads)
    before = current_rss_mb()
    model, _ = load_model(None if args.memory_probe in ("default", "") else args.memory_probe)
    after = current_rss_mb()
    model.eval()
    causal = is_causal_lm(model)
    vocab = vocab_size(model)
    prefill_seconds(model, _token_ids(vocab, (args.batch_size, args.prefill_tokens), args.seed))
    if causal:
        decode_seconds(model, _token_ids(vocab, (args.batch_size, args.context), args.seed + 1), args.decode_tokens)
    return {
        "rss_before_load_mb": before,
        "rss_after_load_mb": after,
        "peak_rss_mb": own_peak_rss_mb(),
        "ru_maxrss_mb": peak_rss_mb(),  # includes the parent's peak on Linux: kept for reference only
        "rss_end_mb": current_rss_mb(),
        "kind": "causal" if causal else "encoder",
        **parameter_bytes(model),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparseforge.eval.speed",
                                     description="Peak-memory probe of one model (used by measure_peak_memory).")
    parser.add_argument("--memory-probe", required=True, metavar="SOURCE", help="model directory, .gguf, cached hub id, or 'default'")
    defaults = SpeedConfig()
    parser.add_argument("--prefill-tokens", type=int, default=defaults.prefill_tokens)
    parser.add_argument("--decode-tokens", type=int, default=defaults.decode_tokens)
    parser.add_argument("--context", type=int, default=defaults.context)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        print(json.dumps(_memory_probe(args)), flush=True)
    except SparseforgeError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
