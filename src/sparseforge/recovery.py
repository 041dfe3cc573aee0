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

from .data import check_seq_len
from .errors import NumericalError
from .methods import RECOVERY, get_method_info
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
from .train import TrainConfig
from .train.run import lm_data, run_training

log = logging.getLogger(__name__)


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
    train_options.setdefault("lr", get_method_info(method, RECOVERY).defaults["lr"])
    config = TrainConfig(steps=steps, eval_first_last=False, **train_options)
    check_seq_len(seq_len, get_adapter(model).context_length())
    layers = target_layers(model, adapter_config.targets)  # a bad target fails before the data work
    run_data = lm_data(tokenizer, data=data, eval_data=eval_data, seq_len=seq_len, text_field=text_field,
                       eval_windows=eval_windows, evaluate=evaluate)
    masks_before = zero_masks(model, layers)
    if method != "lora" and not any(bool(m.any()) for m in masks_before.values()):
        log.warning("the model has no zeros in its %d target layers: %s keeps a zero pattern, so this is plain "
                    "fine-tuning; prune first (--prune METHOD, or a pruned --model)", len(layers), method)
    state = {}

    def inject(m) -> dict:
        state["wrapped"] = inject_adapters(m, adapter_config)
        state["trainable"] = trainable_report(m)
        t = state["trainable"]
        log.info("%s: %d trainable parameters (%.2f per mille of %d)", method, t["trainable"], t["per_mille"], t["model"])
        return None

    def merge(m):
        state["weights"] = adapter_state_dict(m)
        merge_adapters(m)
        state["pattern"] = compare_masks(masks_before, zero_masks(m, target_layers(m, adapter_config.targets)))
        if method != "lora" and not state["pattern"]["identical"]:
            raise NumericalError(f"{method} changed the zero pattern of {', '.join(state['pattern']['layers_changed'][:3])}: "
                                 "a kept weight became exactly zero; rerun with another --seed")
        return m, None

    model, run = run_training(model, run_data, config, prepare=inject, finish=merge, progress=progress, resume=resume,
                              identity={"adapter": asdict(adapter_config)})
    data_info = {**run.data, "tokens_per_step": config.batch_size * config.grad_accum * (seq_len - 1)}
    adapter_dict = asdict(adapter_config)
    adapter_dict["ranks_used"] = sorted({layer.rank for layer in state["wrapped"].values()})
    return FinetuneReport(
        method=method, adapter=adapter_dict, train_config=run.train_config, trainable=state["trainable"], data=data_info,
        perplexity_before=run.metrics_before, perplexity_after=run.metrics_after, pattern=state["pattern"],
        history=run.history, evaluations=run.evaluations, train_seconds=run.train_seconds,
        median_step_seconds=run.median_step_seconds, peak_rss_mb=run.peak_rss_mb,
        training_peak_rss_mb=run.training_peak_rss_mb, resumed_from=run.resumed_from, adapter_weights=state["weights"],
    )


def save_adapter(weights: dict[str, torch.Tensor], path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
