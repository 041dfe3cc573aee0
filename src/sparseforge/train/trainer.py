"""One training loop for every method that trains: recovery adapters now, sparse training later.

Built on Hugging Face Accelerate, so ``accelerate launch`` runs it under DDP,
FSDP or DeepSpeed with no code change. Methods plug in through callbacks (a
sparsifier reading sensitivities from the gradients before the optimizer step
and re-applying masks after it, ...), not by subclassing. The loop is deterministic given the seed: batches are a pure
function of (seed, step) and checkpoints hold the optimizer, scheduler, RNG
and callback states, so a run killed and resumed ends with the same weights
as one that was not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
import zipfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, NumericalError, SparseforgeError, first_line
from ..measure import current_rss_mb, peak_rss_mb
from ..models.base import NEW_WEIGHTS_ATTR
from ..options import LR_SCHEDULES, MIXED_PRECISION
from .data import TrainExamples, batch_rows

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
#: the callbacks' states again, beside accelerate's files: readable BEFORE load_state (see Callback.before_load)
CALLBACK_STATES_FILE = "callback_states.pt"
LOG_FILE = "train_log.jsonl"
FINGERPRINT_SAMPLES = 4096


def model_fingerprint(model) -> str:
    """A cheap digest of a model's weights: each tensor's name, shape, dtype and a fixed strided sample
    of its values. A checkpoint may only be resumed by a run that starts from the same model, and
    hashing every weight of a large model would take seconds. Randomly initialised weights (see
    ``NEW_WEIGHTS_ATTR``) are left out: the checkpoint restores them, whatever their seed."""
    skip = getattr(model, NEW_WEIGHTS_ATTR, frozenset())
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in skip:
                continue
            h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            if tensor.is_meta or tensor.numel() == 0:
                continue
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES]
            h.update(sample.to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def _damaged(path: Path, detail: str) -> ConfigError:
    return ConfigError(f"cannot resume from checkpoint {path} ({detail}): it is damaged or incomplete; delete {path} "
                       "to resume from the one before, or start again without --resume")


@dataclass
class TrainConfig:
    """Optimisation settings. ``batch_size`` is per process and per micro-batch; the
    examples per optimizer step are batch_size x grad_accum x processes."""

    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.03  # fraction of the steps
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    eval_every: int = 0  # steps; 0 = never during training
    eval_first_last: bool = True  # also evaluate before the first step and after the last
    checkpoint_every: int = 0  # steps; 0 = never
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 2
    log_every: int = 10

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if not self.lr > 0:
            raise ConfigError(f"learning rate {self.lr} must be positive")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight decay {self.weight_decay} must be zero or positive")
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("fp16 mixed precision needs a GPU: use --mixed-precision bf16 on CPU")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warm-up fraction {self.warmup} must be in [0, 1)")
        if self.schedule not in LR_SCHEDULES:
            raise ConfigError(f"schedule '{self.schedule}' unknown: choose from {', '.join(LR_SCHEDULES)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed precision '{self.mixed_precision}' unknown: choose from {', '.join(MIXED_PRECISION)}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ConfigError("checkpoint-every needs a checkpoint directory")


def lr_lambda(config: TrainConfig):
    """Linear warm-up, then cosine or linear decay to ``min_lr_ratio`` (or constant)."""
    warmup = int(round(config.warmup * config.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, config.steps - warmup)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape

    return factor


class Callback:
    """Hooks into the loop. Override what you need; ``state_dict`` is checkpointed."""

    def on_train_begin(self, trainer: Trainer) -> None: ...

    def on_gradients(self, trainer: Trainer) -> None:
        """After backward and clipping, before the optimizer step: the step's gradients are in
        ``.grad`` (a sparsifier reads its sensitivities here). ``trainer.step`` is the number
        of steps done before this one."""

    def on_optimizer_step(self, trainer: Trainer) -> None:
        """After every optimizer step (e.g. a sparsifier re-applies its masks here)."""

    def on_step_end(self, trainer: Trainer, record: dict) -> None: ...

    def on_evaluate(self, trainer: Trainer, metrics: dict) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def before_load(self, trainer: Trainer, state: dict | None) -> None:
        """When resuming, before accelerate loads the checkpoint's weights and optimizer state: ``state`` is
        this callback's saved ``state_dict`` (None if the checkpoint has none). A method that changed the
        model's structure during training (e.g. shrank layers) re-applies it here so the shapes match."""


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)  # one record per optimizer step
    evaluations: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    # the process's peak resident memory when training began and when it ended: if the second is
    # higher, training set the peak (loading and data preparation did not)
    peak_rss_before_mb: float = 0.0
    peak_rss_mb: float = 0.0

    def median_step_seconds(self) -> float:
        times = sorted(r["seconds"] for r in self.history)
        return times[len(times) // 2] if times else 0.0


class _Checkpointable:
    """The trainer's own counters and the callbacks' states, for accelerate's save/load_state."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def state_dict(self):
        t = self.trainer
        return {"step": t.step, "callbacks": [c.state_dict() for c in t.callbacks]}

    def load_state_dict(self, state):
        t = self.trainer
        t.step = int(state["step"])
        for callback, s in zip(t.callbacks, state["callbacks"]):
            callback.load_state_dict(s)


def _allow_new_precision(mixed_precision: str) -> None:
    """Accelerate keeps one process-wide state and refuses a second Accelerator with another
    mixed precision; in a single process (not under ``accelerate launch``) a new run may
    choose its own, so the stale state is dropped (the process group, if any, is kept)."""
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed_precision)) != mixed_precision \
            and PartialState().num_processes == 1:
        AcceleratorState._reset_state()


class Trainer:
    """Trains the parameters of ``model`` that require grad on ``examples``.

    ``evaluate(model) -> dict`` (optional) runs before training, every
    ``eval_every`` steps and at the end; its records go to the result.
    """

    def __init__(self, model, examples: TrainExamples, config: TrainConfig, evaluate=None, callbacks=(),
                 progress: bool = True, identity: dict | None = None):
        from accelerate import Accelerator

        self.config = config
        # what a checkpoint must match to be resumed by this run (the caller adds its own, e.g. the adapters)
        # steps shapes the schedule: a run to 4 steps does not continue a run to 2 the same way
        self.identity = {"steps": config.steps, "batch_size": config.batch_size, "grad_accum": config.grad_accum,
                         "seed": config.seed, "lr": config.lr, "schedule": config.schedule, "warmup": config.warmup,
                         "examples": len(examples), "seq_len": examples.seq_len, **(identity or {})}
        self.examples = examples
        self.callbacks = list(callbacks)
        self.evaluate_fn = evaluate
        self.progress = progress
        self.step = 0
        # the train log is written beside the checkpoints, from the first checkpoint on (see _start_log)
        self.history: list[dict] = []
        self._logging = False
        _allow_new_precision(config.mixed_precision)
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the model has no trainable parameters: inject adapters or unfreeze some layers")
        if config.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # the schedule steps once per optimizer step on every process (not prepared: accelerate
        # would step it once per process)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.accelerator.register_for_checkpointing(self.scheduler, _Checkpointable(self))

    @property
    def trainable(self) -> int:
        """Trainable parameters now (a structured method shrinks them during training)."""
        return sum(p.numel() for p in self.accelerator.unwrap_model(self.model).parameters() if p.requires_grad)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_path(self, step: int) -> Path:
        return Path(self.config.checkpoint_dir) / f"step-{step:07d}"

    def log_path(self) -> Path | None:
        return Path(self.config.checkpoint_dir) / LOG_FILE if self.config.checkpoint_dir else None

    def _start_log(self) -> None:
        """Write the records so far; every later step appends its own. Only a run that has a checkpoint
        (written now or resumed) writes anything into the checkpoint directory."""
        if self.accelerator.is_main_process:
            path = self.log_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        self._logging = True

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        path = self.checkpoint_path(self.step)
        tmp = path.with_name(path.name + ".tmp")
        if not self._logging:
            self._start_log()  # before the first checkpoint exists: a resume finds the steps before it logged
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # every process writes its own RNG state into tmp
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"step": self.step, "identity": self.identity, "config": asdict(self.config)}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            torch.save([c.state_dict() for c in self.callbacks], tmp / CALLBACK_STATES_FILE)
            if path.exists():  # a rerun from an earlier checkpoint passes this step again
                shutil.rmtree(path)
            tmp.rename(path)  # a checkpoint exists only once complete
            for old in self.checkpoints()[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        log.info("checkpoint at step %d: %s", self.step, path)
        return path

    def checkpoints(self) -> list[Path]:
        if not self.config.checkpoint_dir:
            return []
        return sorted(p for p in Path(self.config.checkpoint_dir).glob("step-???????") if (p / STATE_FILE).is_file())

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def _required_files(self) -> list[tuple[str, ...]]:
        """What accelerate's save_state wrote and load_state needs, each as alternatives (safetensors or
        torch weights). FSDP and DeepSpeed write their own layouts: only the common files are checked there."""
        from accelerate.utils import MODEL_NAME, OPTIMIZER_NAME, RNG_STATE_NAME, SAFE_MODEL_NAME, DistributedType

        acc = self.accelerator
        files = [(f"{RNG_STATE_NAME}_{i}.pkl",) for i in range(acc.num_processes)]
        files += [(f"custom_checkpoint_{i}.pkl",) for i in range(len(acc._custom_objects))]
        if acc.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
            files += [(f"{SAFE_MODEL_NAME}.safetensors", f"{MODEL_NAME}.bin"), (f"{OPTIMIZER_NAME}.bin",)]
        return files

    def _check_checkpoint_files(self, path: Path) -> None:
        """Cheap checks that name the damaged file (load_state's own errors do not)."""
        from safetensors import SafetensorError, safe_open

        for alternatives in self._required_files():
            found = [path / name for name in alternatives if (path / name).is_file()]
            if not found:
                raise _damaged(path, f"{alternatives[0]} is missing")
            # torch.save writes zip archives, whose directory is at the end: a cut or foreign file has none
            if found[0].suffix in (".bin", ".pkl", ".pt") and not zipfile.is_zipfile(found[0]):
                raise _damaged(path, f"{found[0].name} is truncated or not a torch file")
        weights = path / "model.safetensors"
        if weights.is_file():
            try:
                with safe_open(str(weights), framework="pt"):  # the header only: a truncated file fails here
                    pass
            except (SafetensorError, OSError) as e:
                raise _damaged(path, f"{weights.name}: {first_line(e, 200)}") from None

    def _read_checkpoint_state(self, path: Path) -> dict:
        if not (path / STATE_FILE).is_file():
            raise ConfigError(f"{path} is not a complete checkpoint: give a step-NNNNNNN directory")
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise _damaged(path, f"{STATE_FILE}: {first_line(e, 200)}") from None
        if not isinstance(state, dict) or not isinstance(state.get("identity", {}), dict):
            raise _damaged(path, f"{STATE_FILE} is not a trainer state")
        return state

    def _read_callback_states(self, path: Path) -> list:
        states_path = path / CALLBACK_STATES_FILE
        if not states_path.is_file():
            return []
        try:
            states = torch.load(states_path, weights_only=False)
        except Exception as e:  # torch.load raises what its unpickler meets: EOFError, UnpicklingError, RuntimeError...
            raise _damaged(path, f"{CALLBACK_STATES_FILE}: {first_line(e, 200)}") from None
        if not isinstance(states, list):
            raise _damaged(path, f"{CALLBACK_STATES_FILE} is not a list of callback states")
        return states

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from ``path``. Everything that can be checked is checked before the model changes."""
        path = Path(path)
        saved = self._read_checkpoint_state(path).get("identity", {})
        differ = sorted(k for k in set(saved) | set(self.identity) if saved.get(k) != self.identity.get(k))
        if differ:
            raise ConfigError(f"checkpoint {path} is from a run with other settings ({', '.join(differ)}): "
                              "resume with the same settings or use another --checkpoint-dir")
        self._check_checkpoint_files(path)
        states = self._read_callback_states(path)
        for i, callback in enumerate(self.callbacks):
            callback.before_load(self, states[i] if i < len(states) else None)
        try:
            self.accelerator.load_state(str(path))
        except SparseforgeError:
            raise
        except Exception as e:  # a damaged pickle or weight file raises whatever its reader meets
            raise _damaged(path, first_line(e, 200)) from None
        log.info("resumed from %s (step %d)", path, self.step)

    # ------------------------------------------------------------------ the loop

    def _evaluate(self, result: TrainResult) -> None:
        if self.evaluate_fn is None:
            return
        self.model.eval()
        with torch.no_grad():
            metrics = {"step": self.step, **self.evaluate_fn(self.accelerator.unwrap_model(self.model))}
        self.model.train()
        result.evaluations.append(metrics)
        for c in self.callbacks:
            c.on_evaluate(self, metrics)
        log.info("step %d: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                     if isinstance(v, float)))

    def _micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        acc = self.accelerator
        global_index = index * acc.num_processes + acc.process_index  # each process its own rows
        rows = batch_rows(len(self.examples), self.config.batch_size, global_index, self.config.seed)
        return {k: v.to(acc.device) for k, v in self.examples.batch(rows).items()}

    def _read_log(self, log_path: Path | None) -> list[dict]:
        """The records of the steps this run has already done (a resumed run's earlier part)."""
        if log_path is None or not log_path.exists():
            return []
        try:
            lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as e:  # the log is the report's history only: training goes on without it
            log.warning("cannot read %s (%s): the report will hold the steps from %d on only", log_path, e, self.step + 1)
            return []
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if isinstance(record, dict) and isinstance(record.get("step", 0), int) and record.get("step", 0) <= self.step:
                records.append(record)
        return records

    def _global_tokens(self, batches) -> int:
        """Loss tokens of this step over all micro-batches and processes."""
        count = torch.tensor(sum(self.examples.loss_units(b) for b in batches), device=self.accelerator.device)
        return int(self.accelerator.reduce(count, "sum")) if self.accelerator.num_processes > 1 else int(count)

    def _check_finite(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if self.accelerator.num_processes > 1:  # every process must stop, or the others hang
            finite = self.accelerator.reduce(finite, "min")
        if not bool(finite.item()):
            raise NumericalError(f"training loss is not finite at step {self.step}: lower --lr")

    def train(self, resume: str | Path | bool | None = None) -> TrainResult:
        """Run to ``config.steps``. ``resume``: True = the latest checkpoint if any, or a path.

        Without ``resume``, a checkpoint directory holding another run's checkpoints is refused
        (they would be rotated into this run's or resumed by mistake later)."""
        config, acc = self.config, self.accelerator
        if resume:
            path = self.latest_checkpoint() if resume is True else Path(resume)
            if path is not None:
                self.load_checkpoint(path)
        elif self.checkpoints():
            raise ConfigError(f"{config.checkpoint_dir} holds checkpoints of an earlier run: pass --resume to "
                              "continue it, or choose another --checkpoint-dir")
        result = TrainResult(steps=config.steps, resumed_from=self.step, peak_rss_before_mb=round(peak_rss_mb(), 1))
        log_path = self.log_path()
        # a resumed run repeats the steps after its checkpoint: keep only the records before it
        self.history = result.history = self._read_log(log_path) if self.step else []
        self._logging = False
        if self.step and log_path is not None:
            self._start_log()  # the checkpoint directory exists: rewrite the log without the repeated steps
        for c in self.callbacks:
            c.on_train_begin(self)
        if self.step == 0 and config.eval_first_last:
            self._evaluate(result)
        self.model.train()
        started = time.perf_counter()
        bar = tqdm(total=config.steps, initial=self.step, desc="train", disable=not (self.progress and acc.is_main_process))
        while self.step < config.steps:
            t0 = time.perf_counter()
            batches = [self._micro_batch(self.step * config.grad_accum + j) for j in range(config.grad_accum)]
            step_tokens = max(self._global_tokens(batches), 1)
            loss_sum, tokens = 0.0, 0
            for j, batch in enumerate(batches):
                micro_tokens = self.examples.loss_units(batch)
                # all-reduce gradients only on the last micro-batch of a step
                with acc.no_sync(self.model) if j < len(batches) - 1 else nullcontext():
                    with acc.autocast():
                        loss = self.model(**batch, **self.examples.model_kwargs).loss
                    self._check_finite(loss)
                    # the model's loss is a mean over this micro-batch's tokens; weighting by its share
                    # of the step's tokens makes the step's gradient the mean over all of them (DDP
                    # averages over processes, hence the factor)
                    acc.backward(loss * (micro_tokens * acc.num_processes / step_tokens))
                loss_sum += float(loss.detach()) * micro_tokens
                tokens += micro_tokens
            loss_mean = loss_sum / max(tokens, 1)
            # the loss's graph holds the parameters' gradient accumulators, which keep their shapes: a method that
            # shrinks parameters after this step (TranSpa) would meet them in the next backward
            del loss
            if config.max_grad_norm:
                # all parameters: FSDP and DeepSpeed recognise the whole model and clip across shards
                norm = acc.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                grad_norm = float(norm) if norm is not None else float("nan")
            else:
                grad_norm = float("nan")
            for c in self.callbacks:
                c.on_gradients(self)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            for c in self.callbacks:
                c.on_optimizer_step(self)
            seconds = time.perf_counter() - t0
            # "tokens" counts loss terms: tokens for language modelling, examples for classification
            record = {"step": self.step, "loss": loss_mean, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                      "seconds": seconds, "tokens_per_s": tokens * acc.num_processes / seconds,
                      "rss_mb": current_rss_mb()}
            for c in self.callbacks:  # callbacks add their fields before the record is kept and logged
                c.on_step_end(self, record)
            result.history.append(record)
            if self._logging and acc.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(1)
            unit = self.examples.loss_unit  # tokens for language modelling, examples for classification
            bar.set_postfix({"loss": f"{loss_mean:.4f}", f"{unit}/s": f"{record['tokens_per_s']:.0f}"})
            if config.log_every and self.step % config.log_every == 0:
                log.info("step %d/%d loss %.4f lr %.3g %.0f %s/s", self.step, config.steps, loss_mean, lr,
                         record["tokens_per_s"], unit)
            if config.eval_every and self.step % config.eval_every == 0 and self.step < config.steps:
                self._evaluate(result)
            if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        result.seconds = time.perf_counter() - started
        result.peak_rss_mb = round(peak_rss_mb(), 1)
        if config.eval_first_last:
            self._evaluate(result)
        for c in self.callbacks:
            c.on_train_end(self)
        return result

    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)
