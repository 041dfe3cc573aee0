"""The shared trainer: schedule, accumulation, callbacks, kill-and-resume determinism, data."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from sparseforge.errors import ConfigError, NumericalError
from sparseforge.peft import AdapterConfig, adapter_state_dict, inject_adapters
from sparseforge.train import Callback, TrainConfig, Trainer, TrainExamples, write_wiki_instructions
from sparseforge.train.data import IGNORE, batch_rows, instructions, language_modelling
from sparseforge.train.trainer import lr_lambda
from tiny import VOCAB, tiny_llama


def lm_examples(n=12, seq_len=16, seed=3):
    ids = torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    return TrainExamples(ids, ids.clone(), torch.ones_like(ids), "language-modelling")


def spp_model(seed=0):
    torch.manual_seed(seed)
    model = tiny_llama()
    inject_adapters(model, AdapterConfig(method="spp", spp_rank=4, seed=seed))
    return model


class Counter(Callback):
    """Counts optimizer steps; its count is part of the checkpoint."""

    def __init__(self, stop_at=None):
        self.count, self.stop_at = 0, stop_at

    def on_optimizer_step(self, trainer):
        self.count += 1

    def on_step_end(self, trainer, record):
        if trainer.step == self.stop_at:
            raise KeyboardInterrupt  # a kill between checkpoints, after the step was logged

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(steps=100, warmup=0.1, schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(config)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1)
    linear = lr_lambda(TrainConfig(steps=10, warmup=0.0, schedule="linear"))
    assert [round(linear(s), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]


def test_batches_are_a_function_of_seed_and_step():
    first = [batch_rows(10, 4, i, seed=1) for i in range(5)]
    assert all(torch.equal(a, batch_rows(10, 4, i, seed=1)) for i, a in enumerate(first))
    epoch0 = torch.cat(first)[:10]
    assert sorted(epoch0.tolist()) == list(range(10))  # each row once per epoch
    assert not torch.equal(torch.cat(first)[10:20], epoch0)  # a new order each epoch


def test_gradient_accumulation_equals_the_large_batch():
    results = []
    for batch_size, accum in ((4, 1), (2, 2)):
        model = spp_model()
        trainer = Trainer(model, lm_examples(), TrainConfig(steps=2, batch_size=batch_size, grad_accum=accum, lr=1e-2,
                                                            max_grad_norm=None), progress=False)
        trainer.train()
        results.append(adapter_state_dict(trainer.unwrapped_model()))
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], atol=1e-6, rtol=1e-5)


def test_training_lowers_the_loss_and_calls_callbacks():
    counter = Counter()
    evaluations = []
    model = spp_model()
    trainer = Trainer(model, lm_examples(n=4), TrainConfig(steps=30, batch_size=4, lr=3e-2, warmup=0.0),
                      evaluate=lambda m: {"calls": float(len(evaluations.append(1) or evaluations))},
                      callbacks=[counter], progress=False)
    result = trainer.train()
    assert counter.count == 30 and len(result.history) == 30
    assert result.history[-1]["loss"] < result.history[0]["loss"] - 0.05
    assert [e["step"] for e in result.evaluations] == [0, 30]
    assert all(r["tokens"] == 4 * 15 and r["tokens_per_s"] > 0 for r in result.history)


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    def config(directory):
        return TrainConfig(steps=7, batch_size=2, lr=1e-2, checkpoint_every=2, checkpoint_dir=str(directory),
                           weight_decay=0.01, warmup=0.2)

    straight = Trainer(spp_model(), lm_examples(), config(tmp_path / "a"), callbacks=[Counter()], progress=False)
    straight.train()
    expected = adapter_state_dict(straight.unwrapped_model())

    killed = Trainer(spp_model(), lm_examples(), config(tmp_path / "b"), callbacks=[Counter(stop_at=5)], progress=False)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert sorted(p.name for p in (tmp_path / "b").glob("step-*")) == ["step-0000002", "step-0000004"]

    counter = Counter()
    resumed = Trainer(spp_model(seed=1), lm_examples(), config(tmp_path / "b"), callbacks=[counter], progress=False)
    result = resumed.train(resume=True)
    assert result.resumed_from == 4 and counter.count == 7  # the callback's state came back too
    assert [r["step"] for r in result.history] == list(range(1, 8))  # the earlier part from the log
    got = adapter_state_dict(resumed.unwrapped_model())
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))  # step 5, logged before the kill and redone, appears once

    fresh = Trainer(spp_model(), lm_examples(), config(tmp_path / "b"), progress=False)
    with pytest.raises(ConfigError, match="earlier run"):
        fresh.train()  # a new run must not mix with these checkpoints
    other = TrainConfig(steps=7, batch_size=4, lr=1e-2, checkpoint_every=2, checkpoint_dir=str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="batch_size"):
        Trainer(spp_model(), lm_examples(), other, progress=False).train(resume=True)


def test_non_finite_loss_is_an_error():
    model = spp_model()
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
        for p in model.parameters():
            if p.requires_grad and p.ndim == 1:
                p.fill_(1.0)
    with pytest.raises(NumericalError, match="lower --lr"):
        Trainer(model, lm_examples(), TrainConfig(steps=1), progress=False).train()


def test_bad_configs():
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(ConfigError, match="checkpoint directory"):
        TrainConfig(checkpoint_every=5)
    with pytest.raises(ConfigError, match="no trainable"):
        model = tiny_llama()
        for p in model.parameters():
            p.requires_grad_(False)
        Trainer(model, lm_examples(), TrainConfig(), progress=False)


def test_instruction_rows_take_loss_on_the_response_only(tmp_path, tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    path = tmp_path / "alpaca.jsonl"
    path.write_text(
        json.dumps({"instruction": "Name a colour.", "input": "", "output": "Blue."}) + "\n"
        + json.dumps({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}) + "\n"
    )
    rows = instructions(tokenizer, path, seq_len=96)
    assert len(rows) == 2 and rows.kind == "instructions"
    for i, response in enumerate(["Blue.", "5"]):
        labels = rows.labels[i]
        kept = labels[labels != IGNORE]
        assert tokenizer.decode(kept) == response + tokenizer.eos_token
        first = int((labels != IGNORE).nonzero()[0])
        assert "### Response:" in tokenizer.decode(rows.input_ids[i, :first])
        assert rows.attention_mask[i].sum() == first + len(kept)
    assert "### Input:\n2 and 3" in tokenizer.decode(rows.input_ids[1])


def test_wiki_instructions_and_lm_windows(tmp_path, tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    path = tmp_path / "wiki.jsonl"
    count = write_wiki_instructions(path, limit=5)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert count == 5 == len(records)
    assert records[0]["instruction"].startswith("Write the opening of the Wikipedia article on ")
    assert len(records[0]["output"]) > 20
    rows = instructions(tokenizer, path, seq_len=64)
    assert len(rows) == 5 and (rows.labels != IGNORE).any(dim=1).all()
    text = tmp_path / "t.txt"
    text.write_text("word " * 400)
    lm = language_modelling(tokenizer, str(text), seq_len=32)
    assert lm.input_ids.shape[1] == 32 and torch.equal(lm.input_ids, lm.labels)


def test_gradient_checkpointing_gives_the_same_step():
    results = []
    for checkpointing in (False, True):
        trainer = Trainer(spp_model(), lm_examples(), TrainConfig(steps=2, batch_size=4, lr=1e-2,
                                                                  gradient_checkpointing=checkpointing), progress=False)
        result = trainer.train()
        results.append((result.history, adapter_state_dict(trainer.unwrapped_model())))
    (h0, w0), (h1, w1) = results
    assert [r["loss"] for r in h0] == pytest.approx([r["loss"] for r in h1], abs=1e-6)
    for name in w0:
        torch.testing.assert_close(w0[name], w1[name], atol=1e-6, rtol=1e-5)


def test_bf16_mixed_precision_after_a_float32_run():
    """Two runs with different precision in one process (Accelerate keeps one global state)."""
    float32 = Trainer(spp_model(), lm_examples(), TrainConfig(steps=3, batch_size=4, lr=1e-2), progress=False).train()
    trainer = Trainer(spp_model(), lm_examples(), TrainConfig(steps=3, batch_size=4, lr=1e-2, mixed_precision="bf16"),
                      progress=False)
    bf16 = trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    losses32, losses16 = [r["loss"] for r in float32.history], [r["loss"] for r in bf16.history]
    assert losses16 != losses32 and losses16 == pytest.approx(losses32, rel=0.02)


def test_adapters_train_in_float32_on_a_bf16_model():
    torch.manual_seed(0)
    model = tiny_llama().to(torch.bfloat16)
    inject_adapters(model, AdapterConfig(method="spp", spp_rank=4))
    trainer = Trainer(model, lm_examples(), TrainConfig(steps=3, batch_size=4, lr=1e-2), progress=False)
    result = trainer.train()
    trained = {n: p for n, p in trainer.unwrapped_model().named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    assert all(math.isfinite(r["loss"]) for r in result.history)
    assert any(float(p.detach().abs().sum()) > 0 for n, p in trained.items() if n.endswith("beta"))  # β moved


def test_accumulation_weights_micro_batches_by_their_tokens():
    """Rows with few loss tokens (short instruction responses) weigh as their tokens, not as a whole row."""
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, :12] = IGNORE  # row 0: 3 loss tokens after the shift; the others 15
    labels[1, :2] = IGNORE
    examples = TrainExamples(ids, labels, torch.ones_like(ids), "instructions")
    results = []
    for batch_size, accum in ((4, 1), (1, 4)):
        trainer = Trainer(spp_model(), examples, TrainConfig(steps=1, batch_size=batch_size, grad_accum=accum, lr=1e-2,
                                                             max_grad_norm=None, warmup=0.0), progress=False)
        result = trainer.train()
        results.append((result.history[0]["loss"], adapter_state_dict(trainer.unwrapped_model())))
    (loss_a, w_a), (loss_b, w_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in w_a:
        torch.testing.assert_close(w_a[name], w_b[name], atol=1e-6, rtol=1e-5)


def test_fp16_on_cpu_and_negative_weight_decay_are_refused():
    with pytest.raises(ConfigError, match="bf16 on CPU"):
        TrainConfig(mixed_precision="fp16")
    with pytest.raises(ConfigError, match="weight decay"):
        TrainConfig(weight_decay=-0.1)


# --- checkpoint directory, damaged checkpoints, the starting model's identity ---------------------------------------


def checkpointed(directory, steps=2, every=2, **kwargs):
    return TrainConfig(steps=steps, batch_size=2, lr=1e-2, checkpoint_every=every, checkpoint_dir=str(directory), **kwargs)


def test_no_checkpoint_directory_until_a_checkpoint_is_written(tmp_path, one_thread):
    directory = tmp_path / "out.checkpoints"
    Trainer(spp_model(), lm_examples(), checkpointed(directory, every=0), progress=False).train()
    Trainer(spp_model(), lm_examples(), checkpointed(directory, every=0), progress=False).train(resume=True)
    Trainer(spp_model(), lm_examples(), checkpointed(directory, steps=3, every=5), progress=False).train()
    with pytest.raises(KeyboardInterrupt):  # killed before the first checkpoint
        Trainer(spp_model(), lm_examples(), checkpointed(directory, steps=4, every=3), callbacks=[Counter(stop_at=2)],
                progress=False).train()
    assert not directory.exists()
    Trainer(spp_model(), lm_examples(), checkpointed(directory, steps=3, every=2), progress=False).train()
    assert sorted(p.name for p in directory.iterdir()) == ["step-0000002", "train_log.jsonl"]
    steps = [json.loads(line)["step"] for line in (directory / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the records before the first checkpoint too


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoints")
    Trainer(spp_model(), lm_examples(), checkpointed(directory), callbacks=[Counter()], progress=False).train()
    return directory


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CHECKPOINT_DAMAGE = {
    "state not JSON": lambda p: (p / "trainer_state.json").write_text('{"step": '),
    "state not an object": lambda p: (p / "trainer_state.json").write_text("[2]"),
    "weights cut in half": lambda p: truncate(p / "model.safetensors"),
    "optimizer missing": lambda p: (p / "optimizer.bin").unlink(),
    "optimizer cut in half": lambda p: truncate(p / "optimizer.bin"),
    "optimizer of another run": lambda p: torch.save({"state": {}, "param_groups": []}, p / "optimizer.bin"),
    "random states missing": lambda p: (p / "random_states_0.pkl").unlink(),
    "scheduler state missing": lambda p: (p / "custom_checkpoint_0.pkl").unlink(),
    "trainer counters garbage": lambda p: (p / "custom_checkpoint_1.pkl").write_bytes(b"\x80\x04garbage"),
    "callback states garbage": lambda p: (p / "callback_states.pt").write_bytes(b"not a torch file"),
    "callback states cut in half": lambda p: truncate(p / "callback_states.pt"),
}


@pytest.mark.parametrize("damage", sorted(CHECKPOINT_DAMAGE))
def test_a_damaged_checkpoint_is_one_config_error(checkpoint_dir, tmp_path, damage, one_thread):
    directory = tmp_path / "ck"
    shutil.copytree(checkpoint_dir, directory)
    path = directory / "step-0000002"
    CHECKPOINT_DAMAGE[damage](path)
    trainer = Trainer(spp_model(), lm_examples(), checkpointed(directory), callbacks=[Counter()], progress=False)
    with pytest.raises(ConfigError) as err:
        trainer.train(resume=True)
    message = str(err.value)
    assert message.startswith(f"cannot resume from checkpoint {path} (") and "\n" not in message, message
    assert message.endswith(f"delete {path} to resume from the one before, or start again without --resume")


def test_model_fingerprint_tells_weights_apart():
    from sparseforge.train.trainer import NEW_WEIGHTS_ATTR, model_fingerprint

    a, b = spp_model(seed=0), spp_model(seed=1)
    assert model_fingerprint(a) == model_fingerprint(spp_model(seed=0)) != model_fingerprint(b)
    assert len(model_fingerprint(a)) == 16
    with torch.no_grad():
        a.model.norm.weight[0] += 1  # one value of a small tensor
    assert model_fingerprint(a) != model_fingerprint(spp_model(seed=0))
    # weights the loader initialised randomly (a new classifier head) are left out
    c, d = tiny_llama(), tiny_llama()
    for m in (c, d):
        setattr(m, NEW_WEIGHTS_ATTR, frozenset(n for n, _ in m.named_parameters() if n != "model.norm.weight"))
    with torch.no_grad():
        d.model.norm.weight.copy_(c.model.norm.weight)
    assert model_fingerprint(c) == model_fingerprint(d)


def test_a_checkpoint_resumes_only_from_the_same_starting_model(tmp_path, one_thread):
    from sparseforge.train.run import RunData, run_training

    def run(model, steps=2, resume=None):
        prepare = lambda m: inject_adapters(m, AdapterConfig(method="spp", spp_rank=4)) and None  # noqa: E731
        data = RunData("lm", lm_examples(), None, {"train_fingerprint": "rows"})
        return run_training(model, data, checkpointed(tmp_path / "ck", steps=steps), prepare=prepare, resume=resume,
                            progress=False)[1]

    def model(seed):
        torch.manual_seed(seed)
        return tiny_llama()

    run(model(0))
    with pytest.raises(ConfigError, match=r"checkpoint .*step-0000002 is from a run with other settings \(model\)"):
        run(model(1), resume=True)
    with pytest.raises(ConfigError, match=r"other settings \(steps\)"):
        run(model(0), steps=4, resume=True)
    assert run(model(0), resume=True).resumed_from == 2
