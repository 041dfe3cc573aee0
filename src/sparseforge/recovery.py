"""Recovery fine-tuning of a pruned model: SPP, or the LoRA baselines, on the shared trainer.

    model, tok = load_model("out/smollm2-wanda-50")
    report = finetune(model, tok, method="spp", data="wiki", steps=200)
    save(model, tok, "out/smollm2-wanda-50-spp", metadata=report.to_dict())

The model comes back merged (plain linear layers, no adapter code needed to
load it) and its zero pattern is compared bit for bit with the input's.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch

from .data import check_seq_len, fingerprint, load_windows
from .errors import NumericalError
from .eval.perplexity import perplexity
from .measure import peak_rss_mb
from .models import get_adapter
from .peft import (
    AdapterConfig,
    adapter_state_dict,
    compare_masks,
    inject_adapters,
    merge_adapters,
    target_layers,
    trainable_report,
    zero_masks,
)
from .train import TrainConfig, Trainer, training_examples

log = logging.getLogger(__name__)

#: learning rates used when none is given (SPP: the paper's recipe scale; LoRA: its usual range)
DEFAULT_LR = {"spp": 4e-3, "lora-star": 1e-3, "lora": 1e-3}


@dataclass
class FinetuneReport:
    method: str
    adapter: dict
    train_config: dict
    trainable: dict
    data: dict
    perplexity_before: dict | None
    perplexity_after: dict | None
    pattern: dict
    history: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    median_step_seconds: float = 0.0
    peak_rss_mb: float = 0.0  # the whole run's: loading, data, training, merging
    training_peak_rss_mb: dict = field(default_factory=dict)  # before and after the training loop
    resumed_from: int = 0
    adapter_weights: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("adapter_weights")
        return out


def finetune(
    model,
    tokenizer,
    *,
    method: str = "spp",
    data: str = "wiki",
    steps: int = 100,
    seq_len: int = 512,
    text_field: str = "text",
    rank: int | None = None,
    spp_rank: int = 16,
    scale: float = 1.0,
    lora_alpha: float | None = None,
    targets: tuple[str, ...] | None = None,
    eval_data: str = "wiki",
    eval_windows: int | None = 40,
    evaluate: bool = True,
    resume=None,
    progress: bool = True,
    **train_options,
) -> FinetuneReport:
    """Fine-tune ``model`` in place with adapters, then merge them. Other keyword options are
    fields of TrainConfig (batch_size, grad_accum, lr, warmup, checkpoint_every, ...)."""
    adapter_config = AdapterConfig(method=method, rank=rank, spp_rank=spp_rank, scale=scale, lora_alpha=lora_alpha,
                                   targets=tuple(targets) if targets else None, seed=train_options.get("seed", 0))
    train_options.setdefault("lr", DEFAULT_LR[method])
    config = TrainConfig(steps=steps, eval_first_last=False, **train_options)
    check_seq_len(seq_len, get_adapter(model).context_length())
    layers = target_layers(model, adapter_config.targets)  # a bad target fails before the data work
    examples = training_examples(tokenizer, data, seq_len, text_field)
    # held-out windows (eval_windows None = all) for the perplexity before, during and after
    windows = load_windows(tokenizer, eval_data, "eval", seq_len, n=eval_windows, text_field=text_field) \
        if evaluate else None
    log.info("training data: %d %s rows of %d tokens from %s", len(examples), examples.kind, seq_len, data)

    def periodic_eval(m) -> dict:
        result = perplexity(m, windows, progress=False)
        return {"perplexity": result["perplexity"], "nll": result["nll"]}

    masks_before = zero_masks(model, layers)
    before = perplexity(model, windows, progress=progress) if windows is not None else None
    wrapped = inject_adapters(model, adapter_config)
    trainable = trainable_report(model)
    log.info("%s: %d trainable parameters (%.2f per mille of %d)", method, trainable["trainable"],
             trainable["per_mille"], trainable["model"])
    train_fingerprint = fingerprint(examples.input_ids)
    trainer = Trainer(model, examples, config, evaluate=periodic_eval if windows is not None else None, progress=progress,
                      identity={"adapter": asdict(adapter_config), "train_fingerprint": train_fingerprint})
    result = trainer.train(resume=resume)
    model = trainer.unwrapped_model()
    weights = adapter_state_dict(model)
    merge_adapters(model)
    pattern = compare_masks(masks_before, zero_masks(model, target_layers(model, adapter_config.targets)))
    if method != "lora" and not pattern["identical"]:
        raise NumericalError(f"{method} changed the zero pattern of {', '.join(pattern['layers_changed'][:3])}: "
                             "a kept weight became exactly zero; rerun with another --seed")
    after = perplexity(model, windows, progress=progress) if windows is not None else None
    if before and after:
        log.info("perplexity %.3f -> %.3f", before["perplexity"], after["perplexity"])
    data_info = {"source": data, "kind": examples.kind, "rows": len(examples), "seq_len": seq_len,
                 "tokens_per_step": config.batch_size * config.grad_accum * (seq_len - 1),
                 "train_fingerprint": train_fingerprint,
                 "eval": None if windows is None else {"source": eval_data, "windows": int(windows.shape[0]),
                                                       "fingerprint": fingerprint(windows)}}
    adapter_dict = asdict(adapter_config)
    adapter_dict["ranks_used"] = sorted({layer.rank for layer in wrapped.values()})
    return FinetuneReport(
        method=method, adapter=adapter_dict, train_config=asdict(config), trainable=trainable, data=data_info,
        perplexity_before=before, perplexity_after=after, pattern=pattern, history=result.history,
        evaluations=result.evaluations, train_seconds=round(result.seconds, 3),
        median_step_seconds=round(result.median_step_seconds(), 4), peak_rss_mb=round(peak_rss_mb(), 1),
        training_peak_rss_mb={"before": result.peak_rss_before_mb, "after": result.peak_rss_mb},
        resumed_from=result.resumed_from, adapter_weights=weights,
    )


def save_adapter(weights: dict[str, torch.Tensor], path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
