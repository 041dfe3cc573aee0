"""LoSparse, ITP and low-rank as methods on whole models (METHODS.md sections 5 and 5a).

The pure parts (SVD split, layers, row sensitivities, the global row mask) are unit-tested in
test_lowrank.py; here the method runs on tiny models: the split at model level, the scores and
the EMA the run really computes, the budget of the global threshold, pruned rows staying pruned
(or not), exact resume, the compact / dense exports, and the CLI around it.
"""

from __future__ import annotations

import copy
import json
import random
import re
import shutil
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    M2M100Config,
    M2M100Model,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from sparseforge import load_model, read_metadata, save
from sparseforge.assets import embedded_encoder_dir
from sparseforge.cli import main
from sparseforge.lowrank import CompactLoSparseLinear, LoSparseLinear, global_row_mask, rank_for_ratio
from sparseforge.lowrank.method import LoSparseMethod, densify, losparse_layers
from sparseforge.methods import build_train_method
from sparseforge.models.base import get_weight
from sparseforge.models.modules import block_linears
from sparseforge.train import Callback, TrainConfig, Trainer, TrainExamples
from sparseforge.train.labelled import classification_splits
from sparseforge.training import model_size, train
from tiny import VOCAB, tiny_bert, tiny_llama

WORDS = {
    "food": "bread cheese apple soup pasta rice salad cake butter fruit".split(),
    "music": "guitar piano song melody drum chord rhythm singer album concert".split(),
    "sport": "ball goal team match player score win coach league stadium".split(),
}
BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)
# the classify CLI run of the brief, shortened
CLASSIFY = ["--task", "classify", "--keep", "0.3", "--steps", "12", "--batch-size", "8", "--seq-len", "16", "--lr", "1e-3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def write_labelled(path, n=150, classes=WORDS, seed=0, rows=None):
    """``n`` JSONL rows cycling through the classes, each text 8 words of its class's list."""
    rng = random.Random(seed)
    names = list(classes)
    rows = rows if rows is not None else [
        {"text": " ".join(rng.choices(classes[names[i % len(names)]], k=8)), "label": names[i % len(names)]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BASE BertModel (no head) with the embedded MiniLM tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_encoder_dir())
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(BertConfig(vocab_size=len(tokenizer), **BERT)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_labelled(tmp_path_factory.mktemp("labelled") / "topics.jsonl")


@pytest.fixture(scope="module")
def splits(data_file):
    return classification_splits(str(data_file))


def bert_classifier(bert_dir, splits, seed=0):
    torch.manual_seed(seed)  # the new head
    return load_model(bert_dir, task="classify", label_names=splits[2].names)


def bert_inputs(tokenizer):
    batch = tokenizer(["ball goal cheese team", "piano song melody drum chord rhythm", "rice"], padding=True,
                      return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def logits(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits.clone()


@contextmanager
def capture_before_finish(inputs):
    """While active, LoSparseMethod.finish first records the training-form model: its logits on
    ``inputs``, its LoSparse layers (the modules themselves), the callback's EMA state and the method."""
    captured = {}
    original = LoSparseMethod.finish

    def finish(self, model):
        captured["logits"] = logits(model, inputs)
        captured["layers"] = losparse_layers(model)
        captured["scores"] = self.callback.scores.state_dict() if self.callback else None
        captured["maskings"] = self.callback.maskings if self.callback else 0
        captured["method"] = self
        return original(self, model)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LoSparseMethod, "finish", finish)
        yield captured


def compact_layers(model) -> dict[str, CompactLoSparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompactLoSparseLinear)}


def lm_examples(n=16, seq_len=16, seed=3):
    ids = torch.randint(0, VOCAB, (n, seq_len), generator=gen(seed))
    return TrainExamples(ids, ids.clone(), torch.ones_like(ids), "language-modelling")


def prepared_llama(steps, seed=0, **options):
    torch.manual_seed(seed)
    model = tiny_llama()
    method = build_train_method(options.pop("method", "losparse"), steps, options)
    method.prepare(model)
    return model, method


# ---------------------------------------------------------------- 1. the split at model level


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_prepare_splits_every_block_linear_without_changing_the_model(family):
    torch.manual_seed(0)
    model = {"llama": tiny_llama, "bert": tiny_bert}[family]().eval()
    targets = block_linears(model)
    assert len(targets) == (14 if family == "llama" else 12)
    original = {n: (get_weight(m).detach().clone(), None if m.bias is None else m.bias.detach().clone())
                for n, m in targets.items()}
    assert all((b is None) == (family == "llama") for _, b in original.values())  # llama: no biases; bert: biases
    ids = torch.randint(0, VOCAB, (2, 16), generator=gen(1))
    expected = logits(model, {"input_ids": ids})

    method = build_train_method("losparse", 20, {"keep": 0.3, "rank_ratio": 0.05})
    info = method.prepare(model)

    layers = losparse_layers(model)
    assert sorted(layers) == sorted(targets) and all(isinstance(model.get_submodule(n), LoSparseLinear) for n in targets)
    assert not any(type(m) is nn.Linear for n, m in block_linears(model).items())
    lowrank = 0
    for name, layer in layers.items():
        W, b = original[name]
        out_features, in_features = W.shape
        assert (layer.out_features, layer.in_features) == (out_features, in_features)
        assert layer.rank == rank_for_ratio(out_features, in_features, 0.05) > 0
        lowrank += layer.rank * (out_features + in_features)
        with torch.no_grad():
            UV = layer.lowrank_u @ layer.lowrank_v
            assert UV.abs().max() > 0.01 * W.abs().max()  # a real low-rank part, not S = W
            torch.testing.assert_close(UV + layer.sparse, W, atol=1e-6, rtol=0)
        assert (layer.bias is None) == (b is None)
        if b is not None:
            assert torch.equal(layer.bias.detach(), b)
        assert bool(layer.row_mask.all()) and layer.mask_in_forward
        assert all(p.requires_grad for p in layer.parameters())
    torch.testing.assert_close(logits(model, {"input_ids": ids}), expected, atol=1e-5, rtol=0)
    total = sum(w.numel() for w, _ in original.values())
    assert info["targets"] == len(targets) and info["lowrank_share"] == pytest.approx(lowrank / total)
    assert info["sparse_share"] == pytest.approx(0.3 - lowrank / total)
    assert method.schedule.final == info["sparse_share"] and method.callback.total == total


# ---------------------------------------------------------------- 2. compact == training form; exports


def check_exports(model, tokenizer, captured, inputs, tmp_path, vanilla):
    """The compact model equals the masked training form, and so do its reloads (compact and dense)."""
    compact = compact_layers(model)
    assert sorted(compact) == sorted(captured["layers"]) and not losparse_layers(model)
    assert any(layer.kept_rows() < layer.out_features for layer in captured["layers"].values())  # rows were pruned
    for name, layer in captured["layers"].items():
        assert torch.equal(compact[name].row_index, layer.row_mask.nonzero().squeeze(1))
        assert compact[name].rank == layer.rank
        x = torch.randn(3, layer.in_features, generator=gen(5))
        with torch.no_grad():
            torch.testing.assert_close(compact[name](x), layer(x), atol=1e-5, rtol=0)
    got = logits(model, inputs)
    torch.testing.assert_close(got, captured["logits"], atol=1e-5, rtol=0)

    save(model, tokenizer, tmp_path / "compact", metadata={})  # the manifest comes from the model
    reloaded, _ = load_model(tmp_path / "compact")
    assert sorted(compact_layers(reloaded)) == sorted(compact)
    torch.testing.assert_close(logits(reloaded, inputs), got, atol=1e-5, rtol=0)

    dense = copy.deepcopy(model)
    assert densify(dense) == len(compact)
    save(dense, tokenizer, tmp_path / "dense")
    plain = vanilla.from_pretrained(tmp_path / "dense")  # vanilla transformers, no sparseforge code
    assert all(type(m) is nn.Linear for m in block_linears(plain).values())
    torch.testing.assert_close(logits(plain, inputs), got, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def bert_run(bert_dir, splits):
    """One LoSparse classification run through the API; the training form captured just before finish."""
    model, tokenizer = bert_classifier(bert_dir, splits)
    inputs = bert_inputs(tokenizer)
    with capture_before_finish(inputs) as captured:
        report = train(model, tokenizer, method="losparse", task="classify", data=splits, seq_len=16, steps=12,
                       batch_size=8, lr=1e-3, evaluate=False, progress=False,
                       method_options={"keep": 0.3, "initial_steps": 2, "final_steps": 3, "interval": 2})
    return model, tokenizer, inputs, captured, report


def test_compact_classifier_equals_the_training_form_and_reloads(bert_run, tmp_path):
    model, tokenizer, inputs, captured, report = bert_run
    check_exports(model, tokenizer, captured, inputs, tmp_path, AutoModelForSequenceClassification)
    targets = report.method_report["target_parameters"]
    kept = sum(m.parameter_count() - m.out_features for m in compact_layers(model).values())
    assert targets["compact"] == kept and targets["dense"] == 2 * (4 * 64 * 64 + 2 * 64 * 128)
    assert targets["compact"] <= 0.3 * targets["dense"]  # U, V and S's rows together within --keep
    assert report.size_after["parameters"] == report.size_before["parameters"] - (targets["dense"] - kept)


def test_compact_language_model_equals_the_training_form_and_reloads(tiny_dir, tmp_path):
    from sparseforge.data import wiki_documents

    text = tmp_path / "wiki.txt"
    text.write_text("\n\n".join(wiki_documents("train")[:10]))
    model, tokenizer = load_model(tiny_dir)
    inputs = {"input_ids": torch.randint(0, len(tokenizer), (2, 20), generator=gen(2))}
    with capture_before_finish(inputs) as captured:
        train(model, tokenizer, method="losparse", task="lm", data=str(text), seq_len=32, steps=8, batch_size=2,
              lr=1e-3, evaluate=False, progress=False,
              method_options={"keep": 0.4, "initial_steps": 1, "final_steps": 2, "interval": 2})
    check_exports(model, tokenizer, captured, inputs, tmp_path, AutoModelForCausalLM)


# ---------------------------------------------------------------- 3. sensitivities and the EMA by hand


class GradientRecorder(Callback):
    """Placed after RowPruning: records |S ⊙ ∇S| (float64) at each on_gradients, and the gradient norm."""

    def __init__(self, layers):
        self.layers = layers
        self.steps: list[dict[str, torch.Tensor]] = []
        self.norms: list[float] = []

    def on_gradients(self, trainer):
        self.steps.append({n: (l.sparse.detach().double() * l.sparse.grad.double()).abs() for n, l in self.layers.items()})
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def test_row_scores_are_the_windowed_ema_of_the_sensitivities():
    beta1, interval, steps = 0.7, 3, 7
    model, method = prepared_llama(steps, keep=0.5, rank_ratio=0.05, beta1=beta1, initial_steps=1, final_steps=2,
                                   interval=interval)
    callback = method.callback
    recorder = GradientRecorder(callback.layers)
    trainer = Trainer(model, lm_examples(), TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup=0.0, max_grad_norm=0.1),
                      callbacks=[callback, recorder], progress=False)
    trainer.train()
    assert len(recorder.steps) == steps
    assert max(recorder.norms) <= 0.1 * (1 + 1e-4)  # the callbacks read clipped gradients
    assert callback.maskings == 4  # step 4 (cubic) and 5, 6, 7 (final)
    # windows of ΔT = 3 steps: steps 1-3 and 4-6 are folded in; step 7's window is still open
    windows = [recorder.steps[0:3], recorder.steps[3:6]]
    for name in callback.layers:
        ema = torch.zeros_like(recorder.steps[0][name])
        for window in windows:
            ema = beta1 * ema + (1 - beta1) * torch.stack([s[name] for s in window]).mean(0)
        got = callback.scores.row_scores(name)
        assert got.dtype == torch.float32 and bool((got > 0).any())
        torch.testing.assert_close(got.double(), ema.mean(1), rtol=1e-6, atol=1e-30)
        state = callback.scores.state_dict()["matrices"][name]
        assert state["count"] == 1
        torch.testing.assert_close(state["window"], recorder.steps[6][name].sum(1), rtol=1e-6, atol=1e-30)


# ---------------------------------------------------------------- 4. the global threshold and the schedule


class MaskRecorder(Callback):
    """Placed after RowPruning: the row masks after every step, the scores and budget of every masking,
    and (pruned_rows) checks of the gradients and stored values of pruned rows."""

    def __init__(self, callback):
        self.callback, self.layers = callback, callback.layers
        self.masks = [{n: l.row_mask.clone() for n, l in self.layers.items()}]  # before step 1
        self.maskings: list[dict] = []
        self.pruned_grad_max: list[float] = []  # largest |∇S| on a pruned row, per step
        self.pruned_value_max: list[float] = []  # largest |S| on a pruned row, before the step

    def on_gradients(self, trainer):
        grads = [l.sparse.grad[~l.row_mask].abs().max() for l in self.layers.values() if not l.row_mask.all()]
        values = [l.sparse.detach()[~l.row_mask].abs().max() for l in self.layers.values() if not l.row_mask.all()]
        self.pruned_grad_max.append(float(max(grads)) if grads else float("nan"))
        self.pruned_value_max.append(float(max(values)) if values else float("nan"))

    def on_optimizer_step(self, trainer):
        step = trainer.step
        masks = {n: l.row_mask.clone() for n, l in self.layers.items()}
        if self.callback.schedule.is_masking_step(step):
            self.maskings.append({
                "step": step, "before": self.masks[-1], "after": masks, "budget": self.callback.budget(step),
                "scores": {n: self.callback.scores.row_scores(n) for n in self.layers},
                "zeroed": all(float(l.sparse.detach()[~l.row_mask].abs().sum()) == 0 for l in self.layers.values()),
            })
        self.masks.append(masks)


def run_with_recorder(steps=12, pruned_rows="stay", **options):
    model, method = prepared_llama(steps, keep=0.35, rank_ratio=0.05, pruned_rows=pruned_rows, **options)
    recorder = MaskRecorder(method.callback)
    trainer = Trainer(model, lm_examples(), TrainConfig(steps=steps, batch_size=4, lr=3e-2, warmup=0.0),
                      callbacks=[method.callback, recorder], progress=False)
    result = trainer.train()
    return model, method, recorder, result


def kept_cost(masks, layers) -> int:
    return sum(int(masks[n].sum()) * layers[n].in_features for n in layers)


def test_global_threshold_keeps_the_budget_and_follows_the_schedule():
    model, method, recorder, result = run_with_recorder(initial_steps=2, final_steps=3, interval=2)
    callback, schedule, layers = method.callback, method.schedule, method.callback.layers
    widths = {layer.in_features for layer in layers.values()}
    assert widths == {64, 128}  # rows of different costs compete (down_proj's rows are wider)
    total = callback.total
    assert [m["step"] for m in recorder.maskings] == [4, 6, 8, 9, 10, 11, 12]
    for masking in recorder.maskings:
        budget = int(schedule.kept_fraction(masking["step"]) * total)
        assert masking["budget"] == budget
        cost = kept_cost(masking["after"], layers)
        assert cost <= budget < cost + max(widths), masking["step"]
        # one threshold over the whole model: every kept row scores >= every alive row dropped
        kept = [s for n in layers for s in masking["scores"][n][masking["after"][n]].tolist()]
        dropped = [s for n in layers for s in masking["scores"][n][masking["before"][n] & ~masking["after"][n]].tolist()]
        if dropped:
            assert min(kept) >= max(dropped)
    # the cubic phase's budgets fall, and rows from different layers were dropped
    budgets = [m["budget"] for m in recorder.maskings]
    assert budgets[0] > budgets[1] > budgets[2] > budgets[3] and budgets[3:] == [int(schedule.final * total)] * 4
    assert len({n for n in layers if not recorder.masks[-1][n].all()}) > 1
    final = kept_cost(recorder.masks[-1], layers)
    assert final <= int(schedule.final * total) < final + max(widths)  # the keep part of the budget, to one row
    # the run's history: 1 before t_i, the kept cost at every masking step, unchanged in between
    by_step = {m["step"]: kept_cost(m["after"], layers) / total for m in recorder.maskings}
    fractions = [r["sparse_kept_fraction"] for r in result.history]
    assert fractions[:2] == [1.0, 1.0]
    for record, previous in zip(result.history[2:], fractions[1:]):
        assert record["sparse_kept_fraction"] == by_step.get(record["step"], previous), record["step"]
    # what the compact model keeps
    _, report = method.finish(model)
    lowrank = sum(layer.rank * (layer.out_features + layer.in_features) for layer in layers.values())
    assert report["target_parameters"]["compact"] == lowrank + kept_cost(recorder.masks[-1], layers)
    assert report["target_parameters"]["compact"] <= 0.35 * total and report["maskings"] == 7


def test_classification_history_follows_the_schedule(bert_run):
    *_, captured, report = bert_run
    method = captured["method"]
    schedule, total = method.schedule, method.callback.total
    history = report.run["history"]
    assert [r["step"] for r in history] == list(range(1, 13))
    previous = 1.0
    for record in history:
        step, fraction = record["step"], record["sparse_kept_fraction"]
        if schedule.is_masking_step(step):
            cost = round(fraction * total)
            assert cost <= int(schedule.kept_fraction(step) * total) < cost + 128, step
        else:
            assert fraction == previous, step
        previous = fraction
    final = sum(layer.kept_rows() * layer.in_features for layer in captured["layers"].values())
    assert history[-1]["sparse_kept_fraction"] == final / total
    assert report.method_report["maskings"] == captured["maskings"] == sum(map(schedule.is_masking_step, range(1, 13)))


# ---------------------------------------------------------------- 5. the baselines


@pytest.mark.parametrize("method", ["itp", "lowrank", "dense"])
def test_baselines_reduce_to_their_definitions(method, bert_dir, splits):
    model, tokenizer = bert_classifier(bert_dir, splits)
    shapes = {n: tuple(get_weight(m).shape) for n, m in block_linears(model).items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    total = sum(o * i for o, i in shapes.values())
    options = {} if method == "dense" else {"keep": 0.25, "initial_steps": 1, "final_steps": 2, "interval": 1}
    with capture_before_finish(bert_inputs(tokenizer)) as captured:
        report = train(model, tokenizer, method=method, task="classify", data=splits, seq_len=16, steps=6, batch_size=8,
                       lr=1e-3, evaluate=False, progress=False, method_options=options)
    if method == "dense":
        assert not captured and report.method_report == {}
        assert model_size(model) == report.size_after == report.size_before
        assert sorted(n for n, _ in model.named_parameters()) == sorted(before)
        changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
        assert len(changed) == len(before)  # every weight trained
        return
    layers = {item["name"]: item for item in report.method_report["layers"]}
    compact = compact_layers(model)
    assert sorted(layers) == sorted(compact) == sorted(shapes)
    kept = report.method_report["target_parameters"]["compact"]
    if method == "itp":
        assert all(item["rank"] == 0 and m.lowrank_u.shape[1] == 0 for item, m in zip(layers.values(), compact.values()))
        assert kept == sum(item["rows"] * shapes[n][1] for n, item in layers.items())
        assert kept <= int(0.25 * total) < kept + max(i for _, i in shapes.values())  # within one row
        assert report.method_report["maskings"] == 5
    else:  # lowrank: U V only, the rank spending --keep; S never existed for the optimizer
        for name, item in layers.items():
            assert item["rows"] == 0 and compact[name].rows == 0
            assert item["rank"] == rank_for_ratio(*shapes[name], 0.25) > 0
            layer = captured["layers"][name]
            assert not layer.sparse.requires_grad and layer.sparse.grad is None
            assert float(layer.sparse.detach().abs().sum()) == 0 and not layer.row_mask.any()
        assert kept == sum(item["rank"] * sum(shapes[n]) for n, item in layers.items())
        assert captured["scores"] is None and report.method_report["maskings"] == 0
        trainable = report.run["trainable"]
        assert trainable["trainable"] == trainable["model"] - total  # every S (out x in) frozen, the rest trained
    assert report.size_after["parameters"] == report.size_before["parameters"] - (total - kept)


# ---------------------------------------------------------------- 6. pruned rows: stay or train


def test_pruned_rows_stay_pruned_and_get_no_gradient():
    model, method, recorder, _ = run_with_recorder(initial_steps=1, final_steps=3, interval=2)
    layers = method.callback.layers
    first = recorder.maskings[0]["step"]
    assert sum(not m.all() for m in recorder.masks[first].values()) > 0  # the first masking pruned rows
    for before, after in zip(recorder.masks, recorder.masks[1:]):
        for n in layers:
            assert not bool((after[n] & ~before[n]).any()), n  # never revived
    # once pruned, S's gradient on those rows is exactly zero at every later step
    assert all(g == 0.0 for g in recorder.pruned_grad_max[first:])
    for masking in recorder.maskings:  # the threshold chose only among the rows still alive
        expected = global_row_mask(masking["scores"], method.callback.row_costs, masking["budget"], masking["before"])
        assert all(torch.equal(expected[n], masking["after"][n]) for n in layers)


def test_reference_mode_zeroes_pruned_rows_at_each_masking_and_trains_them_between():
    model, method, recorder, _ = run_with_recorder(pruned_rows="train", initial_steps=1, final_steps=3, interval=3)
    layers, callback = method.callback.layers, method.callback
    assert not callback.sticky and not any(layer.mask_in_forward for layer in layers.values())
    assert [m["step"] for m in recorder.maskings] == [4, 7, 9, 10, 11, 12]
    assert all(m["zeroed"] for m in recorder.maskings)  # zero right after each masking
    first = recorder.maskings[0]["step"]
    # between maskings the gradient reaches pruned rows and AdamW moves them off zero
    assert recorder.pruned_grad_max[first] > 0
    assert recorder.pruned_value_max[first + 1] > 0  # before step 6, i.e. after the un-masked step 5
    for masking in recorder.maskings:  # every row competes again: no "alive" restriction
        expected = global_row_mask(masking["scores"], callback.row_costs, masking["budget"])
        assert all(torch.equal(expected[n], masking["after"][n]) for n in layers)
    # the last step is a masking step: the compact model equals the trained one
    ids = torch.randint(0, VOCAB, (2, 12), generator=gen(7))
    expected = logits(model, {"input_ids": ids})
    model, _ = method.finish(model)
    torch.testing.assert_close(logits(model, {"input_ids": ids}), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- 7. resume


def resumable_run(bert_dir, splits, directory, resume=None, seed=0):
    model, tokenizer = bert_classifier(bert_dir, splits, seed=seed)
    with capture_before_finish(bert_inputs(tokenizer)) as captured:
        report = train(model, tokenizer, method="losparse", task="classify", data=splits, seq_len=16, steps=14,
                       batch_size=8, lr=1e-3, evaluate=False, progress=False, checkpoint_every=7,
                       checkpoint_dir=str(directory), keep_checkpoints=5, resume=resume,
                       method_options={"keep": 0.3, "initial_steps": 2, "final_steps": 3, "interval": 3})
    return model, captured, report


def test_resume_in_the_cubic_phase_reproduces_the_run_bit_for_bit(bert_dir, splits, tmp_path):
    straight, expected, straight_report = resumable_run(bert_dir, splits, tmp_path / "ck")
    schedule = expected["method"].schedule
    # step 7: cubic phase, after the masking at 5, with step 7 alone in an open sensitivity window
    assert schedule.phase(7) == "cubic" and schedule.is_masking_step(5) and not schedule.is_masking_step(7)
    assert sorted(p.name for p in (tmp_path / "ck").glob("step-*")) == ["step-0000007", "step-0000014"]
    shutil.rmtree(tmp_path / "ck" / "step-0000014")  # killed between the checkpoints

    resumed, got, report = resumable_run(bert_dir, splits, tmp_path / "ck", resume=True, seed=1)
    assert report.run["resumed_from"] == 7
    a, b = straight.state_dict(), resumed.state_dict()
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert got["maskings"] == expected["maskings"]
    assert got["scores"]["matrices"].keys() == expected["scores"]["matrices"].keys()
    for name, state in expected["scores"]["matrices"].items():
        for key, value in state.items():
            other = got["scores"]["matrices"][name][key]
            assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value, (name, key)
    assert [r["step"] for r in report.run["history"]] == list(range(1, 15))
    assert [r["loss"] for r in report.run["history"]] == [r["loss"] for r in straight_report.run["history"]]


def test_resumed_history_keeps_the_kept_fraction(bert_dir, splits, tmp_path):
    _, _, straight = resumable_run(bert_dir, splits, tmp_path / "ck")
    shutil.rmtree(tmp_path / "ck" / "step-0000014")
    _, _, resumed = resumable_run(bert_dir, splits, tmp_path / "ck", resume=True)
    assert [r.get("sparse_kept_fraction") for r in resumed.run["history"]] == \
        [r["sparse_kept_fraction"] for r in straight.run["history"]]


# ---------------------------------------------------------------- 8. CLI: bad input


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, data_file):
    d = tmp_path_factory.mktemp("bad")
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    no_label = write_labelled(d / "no_label.jsonl", rows=rows[:4] + [{"text": rows[4]["text"]}] + rows[5:])
    one_class = write_labelled(d / "one_class.jsonl", n=30, classes={"food": WORDS["food"]})
    unseen = write_labelled(d / "unseen.jsonl", n=12, classes={"food": WORDS["food"], "weather": ["rain", "sun", "wind"]})
    m2m = d / "m2m"  # a text model type with no sequence-classification head in transformers
    assert "m2m_100" not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    M2M100Model(M2M100Config(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                             decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                             max_position_embeddings=32)).save_pretrained(m2m)
    return {"no_label": no_label, "one_class": one_class, "unseen": unseen, "m2m": m2m}


def test_tiny_bert_low_rank_share():
    """The share the next test's --keep 0.06 falls below: ranks 2 (64x64) and 3 (128x64, 64x128) at ratio 0.05."""
    per_block = 4 * 2 * (64 + 64) + 2 * 3 * (128 + 64)
    assert [rank_for_ratio(64, 64, 0.05), rank_for_ratio(128, 64, 0.05), rank_for_ratio(64, 128, 0.05)] == [2, 3, 3]
    assert 0.05 < 0.06 < per_block / (4 * 64 * 64 + 2 * 64 * 128) == pytest.approx(0.0664, abs=1e-4)


@pytest.mark.parametrize("case, extra, fragment", [
    ("no_label", [], "has no 'label' field: pass --label-field NAME"),
    ("one_class", [], "one class only ('food')"),
    ("unseen", [], "labels never seen in training: 'weather'"),
    (None, ["--keep", "0"], "--keep: 0 is outside (0, 1]"),
    (None, ["--keep", "1.5"], "--keep: 1.5 is outside (0, 1]"),
    (None, ["--keep", "0.04", "--rank-ratio", "0.05"], "does not exceed the low-rank part alone"),
    (None, ["--keep", "0.06", "--rank-ratio", "0.05"], "is below the low-rank part alone (0.0664"),
    ("m2m", [], "m2m_100 has none"),
])
def test_cli_train_errors_are_one_line_and_write_nothing(capsys, tmp_path, bert_dir, data_file, bad_inputs, case, extra,
                                                         fragment):
    model, data, eval_data = bert_dir, data_file, []
    if case in ("no_label", "one_class"):
        data = bad_inputs[case]
    elif case == "unseen":
        eval_data = ["--eval-data", str(bad_inputs[case])]
    elif case == "m2m":
        model = bad_inputs[case]
    out = tmp_path / "out"
    code = main(["train", "--model", str(model), "--data", str(data), *eval_data, *CLASSIFY, *extra, "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("sparseforge: error:")]
    assert len(errors) == 1 and fragment in errors[0], err
    assert err.rstrip().splitlines()[-1] == errors[0] and "Traceback" not in err  # before it: progress bars at most
    assert not out.exists() and not (tmp_path / "out.checkpoints").exists()


def test_cli_keep_below_the_low_rank_share_fails_before_evaluating(capsys, tmp_path, bert_dir, data_file, monkeypatch):
    import sparseforge.eval.classification as classification

    calls = []
    original = classification.classification_metrics
    monkeypatch.setattr(classification, "classification_metrics", lambda *a, **k: calls.append(1) or original(*a, **k))
    code = main(["train", "--model", str(bert_dir), "--data", str(data_file), *CLASSIFY, "--keep", "0.06",
                 "--output", str(tmp_path / "out")])
    assert code == 2 and "below the low-rank part alone" in capsys.readouterr().err
    assert calls == []


# ---------------------------------------------------------------- 9. CLI: train, info, eval, export


@pytest.fixture(scope="module")
def cli_outputs(tmp_path_factory, bert_dir, data_file):
    """The same classify run exported compact and dense."""
    d = tmp_path_factory.mktemp("cli")
    for export in ("compact", "dense"):
        assert main(["train", "--model", str(bert_dir), "--data", str(data_file), *CLASSIFY, "--export", export,
                     "--output", str(d / export)]) == 0
    return d / "compact", d / "dense"


def test_cli_compact_and_dense_exports_agree(cli_outputs, bert_dir):
    compact_dir, dense_dir = cli_outputs
    compact, tokenizer = load_model(compact_dir)
    dense = AutoModelForSequenceClassification.from_pretrained(dense_dir)  # vanilla transformers
    assert len(compact_layers(compact)) == 12 and not compact_layers(dense)
    assert "structure" in read_metadata(compact_dir) and "structure" not in read_metadata(dense_dir)
    inputs = bert_inputs(tokenizer)
    torch.testing.assert_close(logits(dense, inputs), logits(compact, inputs), atol=1e-5, rtol=0)
    original = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=3)
    assert model_size(compact)["parameters"] < model_size(dense)["parameters"] == model_size(original)["parameters"]


def test_cli_info_lists_the_compact_layers(cli_outputs, capsys):
    compact_dir, _ = cli_outputs
    assert main(["info", str(compact_dir), "--layers"]) == 0
    out = capsys.readouterr().out
    expected = {item["name"]: (item["rank"], item["rows"], item["shape"][0], item["weights"] + item["bias"])
                for item in read_metadata(compact_dir)["train"]["method_report"]["layers"]}
    listed = {m[1]: (int(m[2]), int(m[3]), int(m[4]), int(m[5].replace(",", ""))) for m in re.finditer(
        r"^\s+(\S+)\s+CompactLoSparseLinear\s+rank\s+(\d+)\s+rows\s+(\d+) of (\d+)\s+([\d,]+) parameters$", out, re.M)}
    assert listed == expected and len(listed) == 12
    assert f"compact layers: 12, {sum(v[3] for v in expected.values()):,} parameters (trained with losparse)" in out


def test_cli_eval_prints_accuracy_and_macro_f1(cli_outputs, data_file, capsys):
    compact_dir, _ = cli_outputs
    assert main(["eval", "--model", str(compact_dir), "--data", str(data_file), "--seq-len", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    result = json.loads(lines[-1])
    # by hand: the first 16 tokens of each text, argmax of the logits, F1 per class averaged
    model, tokenizer = load_model(compact_dir)
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    batch = tokenizer([r["text"] for r in rows], truncation=True, max_length=16, padding=True, return_tensors="pt")
    predicted = logits(model, dict(batch)).argmax(-1).tolist()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    targets = [names.index(r["label"]) for r in rows]
    accuracy = sum(p == t for p, t in zip(predicted, targets)) / len(rows)
    f1 = []
    for c in sorted(set(predicted) | set(targets)):
        tp = sum(p == t == c for p, t in zip(predicted, targets))
        precision, recall = tp / max(predicted.count(c), 1), tp / max(targets.count(c), 1)
        f1.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    assert result["n_examples"] == 150
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert result["macro_f1"] == pytest.approx(sum(f1) / len(f1), abs=1e-6)
    assert lines[0].startswith(f"accuracy {accuracy:.4f}  macro-F1 {sum(f1) / len(f1):.4f}  (150 examples of ")
