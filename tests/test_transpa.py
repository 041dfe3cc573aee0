"""TranSpa during training: the round loop, exports, resume across a shrink, the CLI and bench-speed."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sparseforge.cli import main
from sparseforge.errors import ConfigError
from sparseforge.methods import build_train_method, method_names
from sparseforge.models.modules import structure_manifest
from sparseforge.structured import CompactAttention, manifest_includes
from sparseforge.structured.method import count_parameters
from sparseforge.train import Callback, TrainConfig, Trainer, TrainExamples

VOCAB = 96
#: round every 2 steps, K 0.5, θ 0.5: the tiny model reaches 70% in two rounds, then trains on
OPTIONS = {"target_params": 0.7, "round_steps": 2, "fraction": 0.5, "theta": 0.5}
STEPS = 8


def llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def examples():
    ids = torch.randint(0, VOCAB, (12, 16), generator=torch.Generator().manual_seed(3))
    return TrainExamples(ids, ids.clone(), torch.ones_like(ids), "language-modelling")


class Watch(Callback):
    """Snapshots of the weights after every step; stops the run at ``stop_at`` (a kill)."""

    def __init__(self, stop_at=None):
        self.stop_at, self.sizes, self.states = stop_at, [], {}

    def on_step_end(self, trainer, record):
        model = trainer.unwrapped_model()
        self.sizes.append(count_parameters(model))
        self.states[trainer.step] = {k: v.clone() for k, v in model.state_dict().items()}
        if trainer.step == self.stop_at:
            raise KeyboardInterrupt


def run(method="transpa", layout="uniform", steps=STEPS, checkpoint_dir=None, stop_at=None, resume=None, seed=0,
        options=None):
    model = llama(seed)
    m = build_train_method(method, steps, {**OPTIONS, "layout": layout, **(options or {})})
    info = m.prepare(model)
    watch = Watch(stop_at)
    config = TrainConfig(steps=steps, batch_size=2, lr=1e-3, warmup=0.0, weight_decay=0.01,
                         checkpoint_every=3 if checkpoint_dir else 0, checkpoint_dir=checkpoint_dir)
    trainer = Trainer(model, examples(), config, callbacks=[*m.callbacks(), watch], progress=False)
    trainer.train(resume=resume)
    model, report = m.finish(trainer.unwrapped_model())
    return model, report, info, trainer, watch


def logits(model, seed=5):
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("layout", ["uniform", "free"])
def test_rounds_shrink_to_the_target_and_training_goes_on(layout, tmp_path):
    model, report, info, trainer, watch = run(layout=layout)
    target = info["parameters"]["target"]
    trajectory = [t["parameters"] for t in report["trajectory"]]
    assert trajectory[0] == info["parameters"]["start"]
    assert all(b < a for a, b in zip(trajectory, trajectory[1:])) and len(trajectory) >= 2
    final = count_parameters(model)
    assert report["reached_target"] and final == trajectory[-1] == report["final_parameters"]["total"]
    # within half a removal: above by at most half the finest (an FFN unit / slice), below by half a QK unit
    assert -192 <= final - target <= info["parameters"]["tolerance"] == (3 * 64 * (2 if layout == "uniform" else 1)) // 2
    assert trainer.trainable == final
    # the optimizer kept stepping every (shrunk) parameter: its moments follow the shapes, every step counted
    opt = trainer.optimizer.optimizer
    for p in model.parameters():
        state = opt.state[p]
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
        assert int(state["step"]) == STEPS
    last_shrink = report["trajectory"][-1]["step"]
    assert last_shrink < STEPS and watch.sizes[-1] == final
    at_shrink, final_state = watch.states[last_shrink], model.state_dict()
    changed = [k for k, v in final_state.items() if not torch.equal(v, at_shrink[k])]
    assert all(final_state[k].shape == at_shrink[k].shape for k in final_state)  # the last shrink was the last
    assert len(changed) >= len(list(model.parameters())) - 1  # then every (shrunk) weight trained on
    layers = report["layers"]
    if layout == "uniform":
        assert len({(l["ffn"], l["kv_groups"]) for l in layers}) == 1
        model.save_pretrained(tmp_path / "plain")
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
        assert count_parameters(plain) == final
        torch.testing.assert_close(logits(plain), logits(model), atol=0, rtol=0)
    else:
        assert any(isinstance(layer.self_attn, CompactAttention) for layer in model.model.layers)


class KVGroups(Callback):
    """The KV-group counts of the layers after every step."""

    def __init__(self):
        self.counts = []

    def on_step_end(self, trainer, record):
        layers = trainer.unwrapped_model().model.layers
        self.counts.append({layer.self_attn.k_proj.out_features // 8 for layer in layers})


def test_uniform_rounds_only_leave_group_counts_a_plain_config_holds(tmp_path):
    from sparseforge.export import save

    torch.manual_seed(0)  # hidden 64, 8 heads of 8 in 4 KV groups: LlamaConfig refuses 3 groups (6 heads)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                                         max_position_embeddings=128))
    # 0.45 of the parameters: even at FFN width 1, two groups per layer are too many
    m = build_train_method("transpa", 24, {**OPTIONS, "target_params": 0.45, "layout": "uniform"})
    m.prepare(model)
    groups = KVGroups()
    config = TrainConfig(steps=24, batch_size=2, lr=1e-3, warmup=0.0, weight_decay=0.01)
    trainer = Trainer(model, examples(), config, callbacks=[*m.callbacks(), groups], progress=False)
    trainer.train()
    model, report = m.finish(trainer.unwrapped_model())
    assert report["reached_target"]
    seen = [next(iter(c)) for c in groups.counts]
    assert all(len(c) == 1 for c in groups.counts) and 3 not in seen and seen[-1] == 1 and 2 in seen
    save(model, None, tmp_path / "plain", metadata={})  # the save `sparseforge train` does for the uniform layout
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")  # vanilla transformers
    assert plain.config.num_key_value_heads == 1 and plain.config.num_attention_heads == 2
    assert count_parameters(plain) == count_parameters(model)
    torch.testing.assert_close(logits(plain), logits(model), atol=1e-5, rtol=1e-5)


def test_free_layout_reloads_with_sparseforge(tmp_path, tiny_dir):
    from sparseforge.export import save
    from sparseforge.loading import load_model

    model, report, *_ = run(layout="free")
    manifest = structure_manifest(model, include=manifest_includes(model))
    save(model, AutoTokenizer.from_pretrained(tiny_dir), tmp_path / "free", metadata={"structure": manifest})
    loaded, _ = load_model(str(tmp_path / "free"))
    assert count_parameters(loaded) == count_parameters(model)
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_loading_a_free_layout_model_materialises_no_full_size_parameter(tmp_path, tiny_dir, monkeypatch):
    from sparseforge import loading
    from sparseforge.export import save

    model, *_ = run(layout="free")
    manifest = structure_manifest(model, include=manifest_includes(model))
    save(model, AutoTokenizer.from_pretrained(tiny_dir), tmp_path / "free", metadata={"structure": manifest})
    skeletons, apply_structure = [], loading.apply_structure

    def watched(skeleton, *args):  # the skeleton as the loader builds it, before and after the recorded modules go in
        skeletons.append({n: p.is_meta for n, p in skeleton.named_parameters()})
        names = apply_structure(skeleton, *args)
        skeletons.append({n: p.is_meta for n, p in skeleton.named_parameters()})
        return names

    monkeypatch.setattr(loading, "apply_structure", watched)
    loaded, _ = loading.load_model(str(tmp_path / "free"))
    assert len(skeletons) == 2 and all(all(meta.values()) for meta in skeletons)  # no weight before the file's
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert {n: p.shape for n, p in loaded.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    # a new classifier head on the loaded body is initialised (not left empty), the same for the same seed
    heads = []
    for _ in range(2):
        torch.manual_seed(7)
        classifier, _ = loading.load_model(str(tmp_path / "free"), task="classify", label_names=["a", "b", "c"])
        heads.append(classifier.score.weight.detach())
    assert not heads[0].is_meta and torch.equal(heads[0], heads[1])
    assert 0.01 < float(heads[0].std()) < 0.04  # initializer_range 0.02


@pytest.mark.parametrize("ablation", ["structured-l1", "tsvd"])
def test_the_ablations_follow_the_same_rounds(ablation):
    _, coupled, info, *_ = run("transpa")
    _, other, info_other, *_ = run(ablation)
    assert info["parameters"] == info_other["parameters"]
    assert [t["step"] for t in coupled["trajectory"]] == [t["step"] for t in other["trajectory"]]
    assert other["reached_target"] and coupled["rounds"] == other["rounds"]
    assert {ablation, "transpa"} <= set(method_names("train-time"))


@pytest.mark.parametrize("couple_score", ["fisher", "magnitude"])
def test_rounds_select_couples_by_the_couple_score(couple_score, monkeypatch):
    """Every round plans from the chosen couple scores: with ``magnitude`` exactly ``magnitude_scores`` of the model at
    the round (no Fisher accumulated); with ``fisher`` the round's Fisher, which is not the magnitude ranking."""
    import sparseforge.structured.method as method_module
    from sparseforge.structured import magnitude_scores

    seen, plan_round = [], method_module.plan_round

    def spy(model, scores, **options):
        seen.append((dict(scores), magnitude_scores(model)))
        return plan_round(model, scores, **options)

    monkeypatch.setattr(method_module, "plan_round", spy)
    _, report, info, trainer, _ = run("transpa", layout="free", options={"couple_score": couple_score})
    assert len(seen) == report["rounds"] >= 1 and report["reached_target"]
    assert info["config"]["couple_score"] == couple_score
    rounds = next(c for c in trainer.callbacks if isinstance(c, method_module.StructuredRounds))
    if couple_score == "magnitude":
        assert all(scores == magnitude for scores, magnitude in seen) and rounds.fisher.batches == 0
    else:
        assert all(scores.keys() == magnitude.keys() for scores, magnitude in seen)
        assert any(sorted(scores, key=scores.get) != sorted(magnitude, key=magnitude.get) for scores, magnitude in seen)


def test_settings_added_later_stay_out_of_the_resume_identity_at_their_defaults():
    """A checkpoint written before --shrink-schedule / --reach-by / --couple-score existed resumes a run at their
    defaults; any other value is part of the identity, so a mismatch is still caught."""
    default = build_train_method("transpa", STEPS, OPTIONS).identity()["transpa"]
    assert not {"shrink_schedule", "reach_by", "couple_score"} & default.keys() and default["theta"] == 0.5
    other = build_train_method("transpa", STEPS, {**OPTIONS, **LINEAR, "couple_score": "magnitude"}).identity()
    assert other["transpa"]["couple_score"] == "magnitude" and other["transpa"]["reach_by"] == 0.75
    assert other["transpa"]["shrink_schedule"] == "linear"


#: the linear schedule over the tiny run: the line meets the target at step 6 (rounds at 2, 4 and 6)
LINEAR = {"shrink_schedule": "linear", "reach_by": 0.75}


def test_linear_schedule_line_is_the_closed_form():
    m = build_train_method("transpa", STEPS, {**OPTIONS, **LINEAR})
    m.prepare(llama())
    rounds = m.callback
    rounds.trajectory = [{"step": 0, "parameters": 10_000}]
    rounds.target = 4_000
    assert rounds.reach_step == 6
    assert [rounds.allowed(s) for s in (0, 2, 3, 4, 6, 8)] == [10_000, 8_000, 7_000, 6_000, 4_000, 4_000]
    theta = build_train_method("transpa", STEPS, OPTIONS)
    theta.prepare(llama())
    assert theta.callback.reach_step is None and theta.callback.allowed(2) == theta.callback.target


@pytest.mark.parametrize("layout", ["free", "uniform"])
def test_methods_on_the_linear_schedule_share_the_parameter_trajectory(layout):
    """Unscheduled, the tiny run's θ 0.5 rounds reach the target by step 4; on the line every round ends within
    half a removal of it, whichever scorer ranks the units, so TranSpa and structured-l1 hold the same sizes."""
    _, theta, *_ = run("transpa", layout=layout)
    assert theta["trajectory"][-1]["step"] <= 4 and theta["schedule"] == {"kind": "theta", "reach_step": None}
    reports = {method: run(method, layout=layout, options=LINEAR)[1] for method in ("transpa", "structured-l1")}
    for method, report in reports.items():
        assert [p["step"] for p in report["trajectory"]] == [0, 2, 4, 6], method
        largest = 6 * 64 * 2 if layout == "uniform" else 6 * 64  # a QK pair of a group (both q heads and k)
        for point in report["trajectory"][1:]:
            assert abs(point["parameters"] - point["allowed"]) <= largest // 2, (method, point)
        assert report["schedule"]["max_lag"] <= 0 and report["reached_target"]
    first = [p["allowed"] for p in reports["transpa"]["trajectory"][1:]]
    assert first == [p["allowed"] for p in reports["structured-l1"]["trajectory"][1:]]
    assert theta["trajectory"][1]["parameters"] < first[0] - largest  # the cap changed the first round


@pytest.mark.parametrize("layout, method, options", [("free", "transpa", None), ("uniform", "transpa", None),
                                                     ("free", "tsvd", None), ("free", "structured-l1", LINEAR),
                                                     ("free", "transpa", {"couple_score": "magnitude"})])
def test_resume_across_a_shrink_is_bit_identical(layout, method, options, tmp_path):
    straight, report, *_ = run(method, layout=layout, checkpoint_dir=str(tmp_path / "a"), options=options)
    with pytest.raises(KeyboardInterrupt):  # checkpoint at step 3 (after the round at step 2), killed at step 5
        run(method, layout=layout, checkpoint_dir=str(tmp_path / "b"), stop_at=5, options=options)
    resumed, resumed_report, _, trainer, _ = run(method, layout=layout, checkpoint_dir=str(tmp_path / "b"), resume=True,
                                                 seed=1, options=options)
    assert trainer.step == STEPS and resumed_report["trajectory"] == report["trajectory"]
    expected, got = straight.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("options, fragment", [
    ({"target_params": 1.5}, "--target-params 1.5 must be in (0, 1)"),
    ({"target_params": 0.0}, "must be in (0, 1)"),
    ({"fraction": 1.0}, "--fraction 1.0 must be in (0, 1)"),
    ({"theta": 0.0}, "--theta 0.0 must be in (0, 1)"),
    ({"layout": "ragged"}, "--layout 'ragged' unknown"),
    ({"round_steps": 20}, "no removal round"),
    ({"shrink_schedule": "cubic"}, "--shrink-schedule 'cubic' unknown"),
    ({"reach_by": 0.0}, "--reach-by 0.0 must be in (0, 1]"),
    ({"couple_score": "hessian"}, "--couple-score 'hessian' unknown"),
])
def test_bad_settings_are_one_line_errors(options, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        build_train_method("transpa", 10, {**OPTIONS, **options})


def test_target_below_the_embeddings_is_refused_before_training():
    m = build_train_method("transpa", 10, {**OPTIONS, "target_params": 0.1})
    with pytest.raises(ConfigError, match="below the parameters outside the blocks"):
        m.prepare(llama())


@pytest.mark.parametrize("layout", ["uniform", "free"])
def test_a_target_below_what_the_layout_reaches_is_refused_naming_the_floor(layout):
    import re

    from sparseforge.structured import layout_floor

    model = llama()
    total, floor = count_parameters(model), layout_floor(model, layout)
    below = round(floor / total - 0.002, 4)
    with pytest.raises(ConfigError, match=f"below what the {layout} layout can reach") as refused:
        build_train_method("transpa", 10, {**OPTIONS, "target_params": below, "layout": layout}).prepare(model)
    message = str(refused.value)
    assert "\n" not in message and f"{floor:,} of {total:,} parameters" in message
    assert ("--layout free (it reaches" in message) == (layout == "uniform")  # free reaches lower on this LLaMA
    suggested = float(re.search(r"choose --target-params ([0-9.]+) or more", message).group(1))
    assert floor / total <= suggested < floor / total + 1e-4
    m = build_train_method("transpa", 10, {**OPTIONS, "target_params": suggested, "layout": layout})
    assert m.check(model)[3] >= floor  # the suggested target is accepted, and reachable


# ------------------------------------------------------------------ CLI


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def scratch_config(tmp_path, **extra):
    path = tmp_path / "scratch.json"
    path.write_text(json.dumps({"hidden_size": 32, "intermediate_size": 256, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                                "tie_word_embeddings": True, **extra}))
    return path


@pytest.mark.parametrize("argv, fragment", [
    (["--target-params", "1.2"], "--target-params: 1.2 is outside (0, 1)"),
    (["--target-params", "0.5"], "below the parameters outside the blocks"),
    (["--fraction", "0"], "--fraction: 0 is outside (0, 1)"),
    (["--theta", "1"], "--theta: 1 is outside (0, 1)"),
    (["--from-scratch", "BERT"], "bert"),
    (["--from-scratch", "missing-preset"], "neither a JSON config file nor a preset"),
    (["--unit-score", "fisher"], "--unit-score: invalid choice"),
    (["--shrink-schedule", "cubic"], "--shrink-schedule: invalid choice"),
    (["--couple-score", "hessian"], "--couple-score: invalid choice"),
    (["--reach-by", "0"], "--reach-by: 0 is outside (0, 1]"),
    (["--method", "structured-l1", "--unit-score", "activation"], "structured-l1 ranks each matrix"),
    (["--method", "tsvd", "--unit-score", "l1"], "tsvd ranks singular directions of each coupled product"),
])
def test_cli_bad_transpa_inputs(capsys, tmp_path, argv, fragment):
    if "BERT" in argv:
        bert = tmp_path / "bert.json"
        bert.write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
        argv = [bert if a == "BERT" else a for a in argv]
    if "--from-scratch" not in argv:
        argv = [*argv, "--from-scratch", scratch_config(tmp_path)]
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "train", "--method", "transpa", "--steps", "4", "--round-steps", "2", "--no-eval",
                            "--seq-len", "32", "--output", out, *argv)
    assert code == 2 and fragment in err and err.count("\n") == 1 and err.startswith("sparseforge: error: ")
    assert not out.exists()


def test_cli_refuses_the_encoder_target_its_uniform_layout_cannot_reach(capsys, tmp_path):
    # BERT's uniform layout keeps every head: 60% of MiniLM is out of its reach, the free layout's floor is ~54%
    out, report = tmp_path / "out", tmp_path / "report.json"
    code, stdout, err = cli(capsys, "train", "--method", "transpa", "--model", "encoder", "--task", "classify", "--data",
                            "wiki-topics", "--target-params", "0.6", "--steps", "4", "--round-steps", "2", "--no-eval",
                            "--output", out, "--json", report)
    error = err.rstrip("\n").split("\n")[-1]  # after the weights' loading progress bar
    assert code == 2 and error.startswith("sparseforge: error: ") and err.count("sparseforge: error") == 1
    assert "below what the uniform layout can reach" in error and "--layout free" in error
    assert not out.exists() and not report.exists() and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny llamas trained from scratch by the CLI: uniform (plain HF), free (structure manifest), the tSVD
    ablation's free layout, and a free layout whose couples are selected by magnitude (the L1-only ablation)."""
    root = tmp_path_factory.mktemp("transpa-cli")
    text = root / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and more text number {i}." for i in range(400)))
    config = scratch_config(root)
    outs = {}
    for name, method, layout in (("uniform", "transpa", "uniform"), ("free", "transpa", "free"), ("tsvd", "tsvd", "free"),
                                 ("magnitude", "transpa", "free")):
        outs[name] = root / name
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = main(["train", "--method", method, "--from-scratch", str(config), "--data", str(text), "--no-eval",
                         "--steps", "6", "--round-steps", "2", "--target-params", "0.985", "--fraction", "0.5", "--theta", "0.5",
                         "--layout", layout, "--seq-len", "32", "--batch-size", "2", "--keep", "0.3",
                         "--output", str(outs[name]), "--json", str(root / f"{name}.json"),
                         *(["--couple-score", "magnitude", "--warmup", "0.05"] if name == "magnitude" else [])])
        assert code == 0
        (root / f"{name}.stdout").write_text(printed.getvalue())
    return outs, root


def test_cli_transpa_from_scratch_outputs_load(trained):
    from sparseforge.loading import load_model

    outs, root = trained
    report = json.loads((root / "uniform.json").read_text())
    assert report["train"]["run"]["train_config"]["lr"] == 3e-3  # --from-scratch's default, not fine-tuning's 1e-4
    assert report["train"]["run"]["train_config"]["warmup"] == 0.15  # --from-scratch's default, not fine-tuning's 0.03
    assert json.loads((root / "magnitude.json").read_text())["train"]["run"]["train_config"]["warmup"] == 0.05
    assert report["train"]["method_report"]["config"]["unit_score"] == "l1"  # the paper's, from random init
    assert report["train"]["method_report"]["config"]["couple_score"] == "fisher"
    assert json.loads((root / "magnitude.json").read_text())["train"]["method_report"]["config"]["couple_score"] == "magnitude"
    for name, path in outs.items():
        report = json.loads((root / f"{name}.json").read_text())["train"]["method_report"]
        layout = "uniform" if name == "uniform" else "free"
        assert report["reached_target"] and report["layout"] == layout
        meta = json.loads((path / "sparseforge.json").read_text())
        printed = (root / f"{name}.stdout").read_text()  # the saved line says how the output loads
        assert ("a plain HF checkpoint, vanilla transformers loads it" in printed) == (layout == "uniform")
        assert ("load with sparseforge.load_model" in printed) == (layout == "free")
        if layout == "uniform":
            assert "structure" not in meta
            model = AutoModelForCausalLM.from_pretrained(path)  # vanilla transformers
        else:
            assert any(s["class"] == "CompactAttention" for s in meta["structure"]["modules"].values())
            model, _ = load_model(str(path))
        assert count_parameters(model) == report["final_parameters"]["total"]


def test_cli_bench_speed_two_models(capsys, trained):
    outs, root = trained
    code, stdout, err = cli(capsys, "bench-speed", "--model", outs["uniform"], "--model", outs["free"], "--prefill-tokens", "8",
                            "--decode-tokens", "2", "--context", "8", "--repeats", "1", "--warmup", "0", "--threads", "1",
                            "--json", root / "speed.json")
    assert code == 0, err
    assert "prefill tok/s" in stdout and "dense speed" in stdout
    result = json.loads((root / "speed.json").read_text())
    assert len(result["models"]) == 2 and result["machine"]


def test_too_few_rounds_raise_k_or_fail_before_training():
    settings = {"target_params": 0.7, "round_steps": 2, "fraction": 0.3, "theta": 0.9}
    info = build_train_method("transpa", 20, settings).prepare(llama())  # ~14 rounds needed at K 0.3, 10 available
    assert info["fraction_adapted"] and info["fraction_used"] == pytest.approx(0.41)
    assert info["rounds_estimated"] <= info["rounds_available"] == 10
    with pytest.raises(ConfigError, match="2 rounds .* cannot reach --target-params 0.7"):
        build_train_method("transpa", 4, settings).prepare(llama())


def test_any_save_of_a_free_layout_model_records_its_shapes(tmp_path, tiny_dir):
    """save() finds the manifest from the model itself: a free-layout model saved with no manifest from the
    caller (as `prune`, `finetune` and `train --method dense` save it) loads back with the same logits."""
    from sparseforge.export import save
    from sparseforge.loading import load_model

    model, *_ = run(layout="free")
    save(model, AutoTokenizer.from_pretrained(tiny_dir), tmp_path / "free", metadata={"structure": "stale"})
    manifest = json.loads((tmp_path / "free" / "sparseforge.json").read_text())["structure"]["modules"]
    narrowed = [n for n, s in manifest.items() if s["class"] == "Linear"]
    assert narrowed and all(n.split(".")[-2] == "mlp" for n in narrowed)  # only the FFN linears that shrank
    loaded, _ = load_model(str(tmp_path / "free"))
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_an_unchanged_model_saves_without_a_manifest(tmp_path, tiny_dir):
    from sparseforge.export import save

    save(llama(), AutoTokenizer.from_pretrained(tiny_dir), tmp_path / "dense", metadata={})
    assert "structure" not in json.loads((tmp_path / "dense" / "sparseforge.json").read_text())


def test_losparse_factors_inside_compact_attention_save_and_reload(tmp_path, tiny_dir):
    """LoSparse trained on a free-layout model puts compact factors inside compact attention: both are
    recorded (the outer first) and rebuilt, and the reloaded model computes the same logits."""
    from sparseforge.export import save
    from sparseforge.loading import load_model
    from sparseforge.lowrank.layers import LoSparseLinear
    from sparseforge.models.modules import replace_module

    model, *_ = run(layout="free")
    attention = next(n for n, m in model.named_modules() if isinstance(m, CompactAttention))
    for role in ("q_proj", "o_proj"):
        name = f"{attention}.{role}"
        layer = LoSparseLinear.from_linear(model.get_submodule(name), rank=2)
        layer.apply_row_mask(torch.arange(layer.out_features) % 2 == 0)
        replace_module(model, name, layer.compact())
    save(model, AutoTokenizer.from_pretrained(tiny_dir), tmp_path / "nested", metadata={})
    manifest = json.loads((tmp_path / "nested" / "sparseforge.json").read_text())["structure"]["modules"]
    names = list(manifest)
    assert manifest[f"{attention}.q_proj"]["class"] == "CompactLoSparseLinear"
    assert names.index(attention) < names.index(f"{attention}.q_proj")
    loaded, _ = load_model(str(tmp_path / "nested"))
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_cli_prune_of_a_free_layout_model_loads(capsys, trained):
    """A structured model pruned (or fine-tuned) by the CLI is saved with its shapes: eval loads it."""
    outs, root = trained
    text = root / "text.txt"
    pruned = root / "free-pruned"
    code, _, err = cli(capsys, "prune", "--model", outs["free"], "--method", "wanda", "--sparsity", "0.5",
                       "--calib", text, "--n-calib", "2", "--seq-len", "16", "--no-eval", "--output", pruned)
    assert code == 0, err
    code, stdout, err = cli(capsys, "eval", "--model", pruned, "--data", text, "--seq-len", "16",
                            "--eval-windows", "2")
    assert code == 0, err
    assert "perplexity" in stdout
    code, stdout, err = cli(capsys, "info", pruned)
    assert code == 0, err
    assert "compact layers:" in stdout and "(trained with" not in stdout  # its last save was the prune


def test_a_model_its_config_cannot_build_records_every_plain_linear(tmp_path, tiny_dir, monkeypatch):
    """Without the config's shapes to compare with, save records every plain linear (unchanged ones cost
    nothing): the free-layout model still loads, and a caller's config overrides are kept."""
    from sparseforge.export import save
    from sparseforge.loading import load_model
    from sparseforge.models import modules

    model, *_ = run(layout="free")
    monkeypatch.setattr(modules, "_config_built_modules", lambda model: None)
    save(model, AutoTokenizer.from_pretrained(tiny_dir), tmp_path / "free",
         metadata={"structure": {"modules": {}, "config": {"use_cache": True}}})
    manifest = json.loads((tmp_path / "free" / "sparseforge.json").read_text())["structure"]
    assert {n for n, s in manifest["modules"].items() if s["class"] == "Linear"} == set(manifest_includes(model))
    assert manifest["config"] == {"use_cache": True}
    monkeypatch.undo()
    loaded, _ = load_model(str(tmp_path / "free"))
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_training_form_factors_inside_compact_attention_refuse_to_save(tmp_path):
    """LoSparse's training form (no structure() of its own) inside compact attention cannot be recorded:
    the save says so at once and writes nothing, instead of a directory that fails to load."""
    from sparseforge.errors import ModelError
    from sparseforge.export import save
    from sparseforge.lowrank.layers import LoSparseLinear
    from sparseforge.models.modules import replace_module

    model, *_ = run(layout="free")
    attention = next(n for n, m in model.named_modules() if isinstance(m, CompactAttention))
    name = f"{attention}.q_proj"
    replace_module(model, name, LoSparseLinear.from_linear(model.get_submodule(name), rank=2))
    with pytest.raises(ModelError, match="finish the method"):
        save(model, None, tmp_path / "out", metadata={})
    assert not (tmp_path / "out").exists()


def test_scratch_models_get_gpt2_scaled_residual_writers():
    """o_proj and down_proj start at 0.02 / sqrt(2 L) (L = 2 blocks here), every other linear at 0.02."""
    from sparseforge.models.init import scale_residual_writers

    model = llama()
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert scale_residual_writers(model) == pytest.approx(0.5)
    for name, p in model.named_parameters():
        factor = 0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
        torch.testing.assert_close(p, before[name] * factor, atol=0, rtol=0)
    big = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                                       num_attention_heads=4, num_key_value_heads=2))
    scale_residual_writers(big)
    assert float(big.model.layers[3].mlp.down_proj.weight.detach().std()) == pytest.approx(0.02 / 4, rel=0.05)
    assert float(big.model.layers[3].mlp.up_proj.weight.detach().std()) == pytest.approx(0.02, rel=0.05)


def test_random_llama_is_drawn_from_its_seed_and_scaled_after():
    """The same seed gives the same model; the scaled model is the unscaled one with o_proj / down_proj times
    1/sqrt(2 L); another seed gives other weights."""
    from sparseforge.models.init import random_llama

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    plain = dict(random_llama(config, 3, scaled_residual=False).named_parameters())
    scaled = dict(random_llama(config, 3).named_parameters())
    again = dict(random_llama(config, 3).named_parameters())
    other = dict(random_llama(config, 4).named_parameters())
    for name, p in scaled.items():
        factor = 0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
        torch.testing.assert_close(p, plain[name] * factor, atol=0, rtol=0)
        assert torch.equal(p, again[name]), name
    assert not torch.equal(scaled["model.layers.0.mlp.up_proj.weight"], other["model.layers.0.mlp.up_proj.weight"])
