"""The sequential engine on tiny random Llama / OPT / GPT-2 models."""

import pytest
import torch

from sparseforge import prune
from sparseforge.errors import ConfigError, ModelError, PatternError
from sparseforge.models import get_adapter, get_weight
from sparseforge.sparsity import Pattern, prune_count, satisfies
from tiny import VOCAB, tiny_llama


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["0.5", "2:4", "0.7"])
def test_achieved_sparsity_equals_request_per_layer(tiny_model, calib_windows, method, pattern):
    report = prune(tiny_model, method=method, pattern=pattern, calibration=calib_windows, progress=False)
    adapter = get_adapter(tiny_model)
    p = Pattern.parse(pattern)
    assert len(report.layers) == len(adapter.blocks) * len(adapter.linear_names)
    modules = dict(tiny_model.named_modules())
    for layer in report.layers:
        weight = get_weight(modules[layer.name]).detach()
        assert satisfies(weight, p), layer.name
        if p.is_nm:
            assert layer.sparsity == pytest.approx(p.target_sparsity)
        else:
            assert int((weight == 0).sum()) == prune_count(weight.numel(), p.sparsity), layer.name
    assert report.sparsity == pytest.approx(p.target_sparsity, abs=2e-3)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sparsity_zero_leaves_logits_unchanged(tiny_model, calib_windows, method):
    ids = calib_windows[:2]
    before = logits(tiny_model, ids)
    prune(tiny_model, method=method, sparsity=0.0, calibration=calib_windows, progress=False)
    assert torch.equal(logits(tiny_model, ids), before)


@pytest.mark.parametrize("kwargs", [{"batch_size": 1}, {"propagate": "dense"}, {"batch_size": 2, "propagate": "dense"}])
def test_two_pass_and_dense_propagation(calib_windows, kwargs):
    torch.manual_seed(0)
    model = tiny_llama()
    report = prune(model, method="sparsegpt", sparsity=0.5, calibration=calib_windows, progress=False, **kwargs)
    assert report.sparsity == pytest.approx(0.5)
    assert all(0 <= layer.relative_error < 1 for layer in report.layers)


def test_one_pass_and_two_pass_agree_on_the_first_group(calib_windows):
    """q/k/v see the same block input in both modes, so they prune identically."""
    models = []
    for batch_size in (None, 1):
        torch.manual_seed(0)
        model = tiny_llama()
        prune(model, method="sparsegpt", sparsity=0.5, calibration=calib_windows, batch_size=batch_size,
              progress=False)
        models.append(model)
    q = [m.model.layers[0].self_attn.q_proj.weight for m in models]
    assert torch.allclose(q[0], q[1], atol=1e-5)


def test_two_pass_statistics_pass_stops_at_the_last_group(calib_windows):
    """The statistics pass ends each forward at the last group's input (its outputs are not needed):
    down_proj computes only in the output pass, and the statistics still cover every micro-batch
    (micro-batches of 1 and of 2 windows prune alike)."""
    pruned, calls = [], []
    for batch_size in (1, 2):
        torch.manual_seed(0)
        model = tiny_llama()
        calls.append(0)
        for block in get_adapter(model).blocks:
            block.mlp.down_proj.register_forward_hook(lambda *a: calls.__setitem__(-1, calls[-1] + 1))
        prune(model, method="sparsegpt", sparsity=0.5, calibration=calib_windows, batch_size=batch_size, progress=False)
        pruned.append({n: get_weight(m).detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    n_blocks = len(get_adapter(tiny_llama()).blocks)
    assert calls == [n_blocks * len(calib_windows), n_blocks * len(calib_windows) // 2]
    for name in pruned[0]:
        assert torch.equal(pruned[0][name] == 0, pruned[1][name] == 0), name
        torch.testing.assert_close(pruned[1][name], pruned[0][name], rtol=1e-4, atol=1e-5)


def test_sparsegpt_layer_error_below_wanda(calib_windows):
    errors = {}
    for method in ("wanda", "sparsegpt"):
        torch.manual_seed(0)
        model = tiny_llama()
        ids = calib_windows
        dense = logits(model, ids)
        prune(model, method=method, sparsity=0.6, calibration=calib_windows, progress=False)
        errors[method] = float((logits(model, ids) - dense).square().mean())
    assert errors["sparsegpt"] < errors["wanda"]


def test_bfloat16_compute_keeps_float32_weights(calib_windows):
    torch.manual_seed(0)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model, method="sparsegpt", sparsity=0.0, calibration=calib_windows, compute_dtype="bfloat16",
          progress=False)
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, before[key]), key
    report = prune(model, method="sparsegpt", sparsity=0.5, calibration=calib_windows, compute_dtype="bfloat16",
                   progress=False)
    assert report.sparsity == pytest.approx(0.5)
    assert model.model.norm.weight.dtype == torch.float32


def test_float16_model_prunes_with_float32_statistics(calib_windows):
    torch.manual_seed(0)
    model = tiny_llama().to(torch.float16)
    report = prune(model, method="sparsegpt", sparsity=0.5, calibration=calib_windows, progress=False)
    assert report.sparsity == pytest.approx(0.5)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float16
    assert torch.isfinite(logits(model, calib_windows[:1]).float()).all()


def test_overrides_skip_and_block_fraction(calib_windows):
    torch.manual_seed(0)
    model = tiny_llama()
    report = prune(
        model, method="wanda", sparsity=0.5, calibration=calib_windows, progress=False,
        overrides={"*.mlp.down_proj": "2:4"}, skip=("*.self_attn.o_proj",), block_fraction=0.5,
    )
    names = {layer.name: layer for layer in report.layers}
    assert all(name.startswith("model.layers.0.") for name in names)
    assert "model.layers.0.self_attn.o_proj" not in names
    assert names["model.layers.0.mlp.down_proj"].pattern == "2:4"
    assert (model.model.layers[1].mlp.down_proj.weight != 0).all()
    assert (model.model.layers[0].self_attn.o_proj.weight != 0).all()


def test_gpt2_conv1d_is_pruned_along_its_inputs(calib_windows):
    from tiny import tiny_gpt2

    torch.manual_seed(0)
    model = tiny_gpt2()
    prune(model, method="sparsegpt", pattern="2:4", calibration=calib_windows, progress=False)
    c_fc = model.transformer.h[0].mlp.c_fc.weight  # Conv1D: (in, out)
    groups = (c_fc.T.reshape(c_fc.shape[1], -1, 4) != 0).sum(-1)
    assert (groups <= 2).all()


def test_pattern_that_does_not_fit_fails_before_work(calib_windows):
    torch.manual_seed(0)
    model = tiny_llama()
    with pytest.raises(PatternError, match="not a multiple of M=48"):
        prune(model, method="sparsegpt", pattern="2:48", calibration=calib_windows, progress=False)
    assert (model.model.layers[0].self_attn.q_proj.weight != 0).all()


def test_bad_settings_raise_config_errors(calib_windows):
    model = tiny_llama()
    with pytest.raises(ConfigError, match="unknown method 'obs'"):
        prune(model, method="obs", sparsity=0.5, calibration=calib_windows, progress=False)
    with pytest.raises(ConfigError, match="propagate"):
        prune(model, sparsity=0.5, calibration=calib_windows, propagate="sideways", progress=False)
    with pytest.raises(ConfigError, match="needs calibration data"):
        prune(model, sparsity=0.5, calibration=torch.zeros(0, 8, dtype=torch.long), progress=False)


def test_unknown_architecture_names_the_fix():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    model = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                                           attention_types=[[["global"], 2]], max_position_embeddings=64))
    with pytest.raises(ModelError, match="add an adapter"):
        get_adapter(model)


def test_ffn_in_chunks_matches_the_ffn_modules_own_forward(tiny_model):
    adapter = get_adapter(tiny_model)
    block = adapter.blocks[0]
    chunked = adapter.ffn_in_chunks(block, chunk_tokens=7)  # 2 x 9 tokens: two full chunks and a part
    if adapter.ffn.module is None:
        assert chunked is None  # OPT's FFN is no module of its own
        return
    x = torch.randn(2, 9, tiny_model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), block.get_submodule(adapter.ffn.module)(x), rtol=1e-5, atol=1e-6)


def _prune_stock_or_chunked(model, monkeypatch, chunk_tokens, **kwargs):
    """Prune ``model`` at 60%; ``chunk_tokens=None``: the stock one-call forward of each block (no
    chunked branches, no chunked FFN), else the chunked path with chunks of that many tokens."""
    import sparseforge.oneshot.engine as engine
    from sparseforge.models.base import ModelAdapter

    if chunk_tokens is None:
        monkeypatch.setattr(ModelAdapter, "ffn_in_chunks", lambda self, block, n: None)
        monkeypatch.setattr(type(get_adapter(model)), "residual_branches", ())
    else:
        monkeypatch.setattr(engine, "CHUNK_TOKENS", chunk_tokens)
    prune(model, sparsity=0.6, progress=False, **kwargs)
    monkeypatch.undo()


def _pruned_linears(model_fn, method, calib, monkeypatch, chunk_tokens):
    torch.manual_seed(0)
    model = model_fn().eval()
    _prune_stock_or_chunked(model, monkeypatch, chunk_tokens, method=method, calibration=calib)
    return {n: get_weight(m).detach() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}


@pytest.mark.parametrize(("family", "method", "chunk_tokens"), [
    *[(f, m, c) for f, m in [("llama", "sparsegpt"), ("llama", "wanda"), ("gpt2", "sparsegpt")]
      for c in (32, 64)],  # windows of 32 tokens: chunks of 1 and of 2 windows
    # SparseLLM's least-squares iterations amplify rounding, and its choice of iterate is a
    # comparison, so chunks whose sums round differently may choose another iterate: one chunk
    # of all 4 windows runs the branch-wise path (gather, stop, prune, re-run) on identical sums
    ("llama", "sparsellm", 128),
])
def test_chunked_block_prunes_as_the_whole_forward(calib_windows, monkeypatch, family, method, chunk_tokens):
    """The engine's one-pass path that runs a block branch by branch in chunks of windows (a memory
    saving) changes neither the masks nor the weights: every group is still pruned from every token's
    statistics before any token goes past it, and the block's output is the same."""
    from tiny import TINY_MODELS

    whole = _pruned_linears(TINY_MODELS[family], method, calib_windows, monkeypatch, None)
    chunked = _pruned_linears(TINY_MODELS[family], method, calib_windows, monkeypatch, chunk_tokens)
    for name in whole:  # float rounding of the chunked sums only
        assert torch.equal(whole[name] == 0, chunked[name] == 0), name
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(("family", "method", "wide", "narrow", "recomputed"), [
    # 2 chunks; the residual stream holds 4 x 32 x 64 elements, an FFN chunk 2 x 32 x (FFN width):
    # for SparseGPT, LLaMA (FFN 128) keeps one chunk, GPT-2 (FFN 256) none; Wanda keeps both
    ("llama", "sparsegpt", "mlp.up_proj", "self_attn.q_proj", 1),
    ("qwen2", "wanda", "mlp.up_proj", "self_attn.q_proj", 0),
    ("gpt2", "sparsegpt", "mlp.c_fc", "attn.c_attn", 2),
])
def test_the_ffn_intermediate_kept_is_bounded_by_the_stream(calib_windows, monkeypatch, family, method, wide,
                                                             narrow, recomputed):
    """For the Hessian methods the one pass keeps a branch's last input only up to the residual stream's
    size: the attention output whole, the FFN intermediate for its first chunks, the rest recomputed (the
    FFN's first layers run once more for those chunks); Wanda keeps it whole; ``low_memory`` keeps none
    of the FFN intermediate. Recomputing is the same arithmetic on the same tensors, so the weights and
    logits of all are bit for bit equal."""
    import sparseforge.oneshot.engine as engine
    from tiny import TINY_MODELS

    monkeypatch.setattr(engine, "CHUNK_TOKENS", 64)  # 2 chunks of 2 windows of 32 tokens

    def run(low_memory):
        torch.manual_seed(0)
        model = TINY_MODELS[family]().eval()
        block = get_adapter(model).blocks[0]
        calls = {wide: 0, narrow: 0}
        handles = [block.get_submodule(n).register_forward_hook(
            lambda m, a, out, n=n: calls.__setitem__(n, calls[n] + 1)) for n in calls]
        prune(model, method=method, sparsity=0.6, calibration=calib_windows, low_memory=low_memory, progress=False)
        for h in handles:
            h.remove()
        weights = {n: get_weight(m).detach().clone() for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
        return weights, logits(model, calib_windows), calls

    default_weights, default_logits, default_calls = run(False)
    lean_weights, lean_logits, lean_calls = run(True)
    gathered = 2  # the pass that gathers the last layer's statistics runs the FFN's first layers on each chunk
    assert default_calls[wide] == gathered + recomputed, default_calls
    assert lean_calls[wide] == gathered + 2, lean_calls  # every chunk recomputed
    assert lean_calls[narrow] == default_calls[narrow], (default_calls, lean_calls)  # attention never rerun
    for name, weight in default_weights.items():
        assert torch.equal(lean_weights[name], weight), name
    assert torch.equal(lean_logits, default_logits)


def test_low_memory_says_when_it_changes_nothing(calib_windows, caplog):
    """In the two-pass mode nothing is kept, so ``low_memory`` has nothing to drop: a warning says so."""
    model = tiny_llama().eval()
    with caplog.at_level("WARNING", logger="sparseforge"):
        prune(model, method="wanda", sparsity=0.5, calibration=calib_windows, batch_size=2, low_memory=True,
              progress=False)
    assert "changes nothing" in caplog.text


def test_low_memory_says_when_the_blocks_cannot_be_chunked(calib_windows, caplog, monkeypatch):
    """One pass, but arguments the chunks cannot share (``block_keywords`` gives None): the blocks run whole, so
    ``low_memory`` changes nothing, and a warning says so; the result is that of the same run without it."""
    import sparseforge.oneshot.engine as engine

    monkeypatch.setattr(engine, "block_keywords", lambda *args: None)
    torch.manual_seed(0)
    reference = tiny_llama().eval()
    prune(reference, method="wanda", sparsity=0.5, calibration=calib_windows, progress=False)
    torch.manual_seed(0)
    model = tiny_llama().eval()
    with caplog.at_level("WARNING", logger="sparseforge"):
        prune(model, method="wanda", sparsity=0.5, calibration=calib_windows, low_memory=True, progress=False)
    assert caplog.text.count("low_memory changes nothing here") == 1
    for (name, weight), expected in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(weight, expected), name


def test_keep_rules_are_known_and_an_unknown_one_fails():
    """Every method's keep rule is one the chunked pass knows; any other fails before any work."""
    from sparseforge.oneshot.chunked import KEEP_WIDE, prune_block_in_chunks
    from sparseforge.oneshot.methods import METHODS

    assert {m.keep_wide for m in METHODS.values()} <= set(KEEP_WIDE)
    assert METHODS["sparsegpt"].keep_wide == "stream" and METHODS["wanda"].keep_wide == "all"
    with pytest.raises(ValueError, match="keep_wide must be one of all, stream, none"):
        prune_block_in_chunks(torch.nn.Identity(), (), [], torch.zeros(1, 2, 4), {}, [], 1, keep_wide="half")


@pytest.mark.parametrize(("family", "first_linear"), [("llama", "self_attn.q_proj"), ("gpt2", "attn.c_attn")])
def test_chunked_path_runs_the_block_a_window_chunk_at_a_time(calib_windows, monkeypatch, family, first_linear):
    """The one-pass default takes the chunked path where the adapter allows (GPT-2's model passes some
    block arguments by position): every call into the attention sees at most one chunk of windows
    (the stock path would call it once with all four)."""
    import sparseforge.oneshot.engine as engine
    from tiny import TINY_MODELS

    monkeypatch.setattr(engine, "CHUNK_TOKENS", 64)  # 2 windows of 32 tokens
    model = TINY_MODELS[family]().eval()
    batches = []
    handle = get_adapter(model).blocks[1].get_submodule(first_linear).register_forward_pre_hook(
        lambda m, args: batches.append(args[0].shape[0]))
    prune(model, method="sparsegpt", sparsity=0.5, calibration=calib_windows, progress=False)
    handle.remove()
    assert batches and max(batches) == 2, batches


@pytest.mark.parametrize("skip", [("*.self_attn.o_proj", "*.mlp.down_proj"), ("*.layers.0.mlp.*",)])
def test_chunked_branch_rerun_gives_the_blocks_output(calib_windows, monkeypatch, skip):
    """Where a branch's last layer is skipped, or nothing in it is pruned, the chunked path runs the
    branch again for its output: the pruned model's logits equal those of the stock forward's run."""
    def pruned_logits(chunk_tokens):
        torch.manual_seed(0)
        model = tiny_llama().eval()
        _prune_stock_or_chunked(model, monkeypatch, chunk_tokens, method="sparsegpt", calibration=calib_windows,
                                skip=skip)
        return logits(model, calib_windows)

    torch.testing.assert_close(pruned_logits(32), pruned_logits(None), rtol=1e-4, atol=1e-4)


def test_block_keywords_refuses_a_hidden_signature():
    from sparseforge.oneshot.chunked import block_keywords

    class Wrapped(torch.nn.Module):
        def forward(self, *args, **kwargs):
            return args[0]

    assert block_keywords(Wrapped(), (None,), {}, 4) is None


def test_block_keywords_refuse_per_window_state_they_cannot_slice():
    """An object holding a tensor per window (as a flex-attention BlockMask of a padded batch does) would
    reach every chunk whole: the block then runs whole. Tensors, shared objects and one window are fine."""
    from sparseforge.oneshot.chunked import block_keywords

    class Block(torch.nn.Module):
        def forward(self, hidden, attention_mask=None, position_embeddings=None):
            return hidden

    class Mask:  # stands for a BlockMask: its block counts have a leading batch dimension
        def __init__(self, batch):
            self.kv_num_blocks = torch.zeros(batch, 2, 1, dtype=torch.int32)

    rotary = (torch.zeros(1, 8, 4), torch.zeros(1, 8, 4))
    assert block_keywords(Block(), (), {"attention_mask": Mask(4), "position_embeddings": rotary}, 4) is None
    assert block_keywords(Block(), (), {"attention_mask": {"full": Mask(4)}}, 4) is None
    kept = block_keywords(Block(), (), {"attention_mask": Mask(1), "position_embeddings": rotary}, 4)
    assert set(kept) == {"attention_mask", "position_embeddings"}
    assert block_keywords(Block(), (), {"attention_mask": torch.zeros(4, 1, 8, 8)}, 4) is not None
    assert block_keywords(Block(), (), {"attention_mask": Mask(4)}, 1) is not None  # one window: no chunks


def test_chunked_path_names_a_layer_outside_every_branch(calib_windows, monkeypatch):
    from sparseforge.models.base import ResidualBranch
    from sparseforge.models.families import LlamaAdapter

    monkeypatch.setattr(LlamaAdapter, "residual_branches", (ResidualBranch("input_layernorm", "self_attn", True),))
    with pytest.raises(ModelError, match="mlp.gate_proj.*no residual branch"):
        prune(tiny_llama().eval(), method="sparsegpt", sparsity=0.5, calibration=calib_windows, progress=False)


def test_each_block_is_called_with_its_own_arguments(calib_windows):
    """Qwen2 with sliding-window layers after a full-attention one: the captured per-block arguments,
    fed block by block, reproduce the model's own hidden states; block 0's reused would not."""
    from sparseforge.oneshot.engine import _run_block, capture_block_inputs
    from tiny import tiny_qwen2_mixed

    torch.manual_seed(0)
    model = tiny_qwen2_mixed().eval()
    blocks = get_adapter(model).blocks
    with torch.no_grad():
        expected = model.model(input_ids=calib_windows, output_hidden_states=True).hidden_states
        hidden, calls = capture_block_inputs(model, blocks, list(calib_windows.split(2)))
        own, reused = hidden, hidden
        for index in range(len(blocks) - 1):  # the last hidden state has the final norm applied
            own = _run_block(blocks[index], own, calls[index], None, torch.float32)
            reused = _run_block(blocks[index], reused, calls[0], None, torch.float32)
            torch.testing.assert_close(torch.cat(own), expected[index + 1])
    assert not torch.allclose(torch.cat(reused), expected[len(blocks) - 1], atol=1e-3)


@pytest.mark.parametrize("mode", ["one pass, chunked", "one pass, stock", "two passes"])
def test_propagated_activations_are_the_pruned_models_own(calib_windows, monkeypatch, mode):
    """What the engine hands block i+1 is the pruned model's own hidden state there, in every mode,
    on a model whose blocks take different attention masks (Qwen2 with sliding-window layers)."""
    import sparseforge.oneshot.engine as engine
    from tiny import tiny_qwen2_mixed

    torch.manual_seed(0)
    model = tiny_qwen2_mixed().eval()
    propagated = []
    prune_block = engine._prune_block

    def recording(*args, **kwargs):
        results, outputs, details = prune_block(*args, **kwargs)
        propagated.append(torch.cat(outputs).clone())
        return results, outputs, details

    monkeypatch.setattr(engine, "_prune_block", recording)
    if mode == "one pass, chunked":
        _prune_stock_or_chunked(model, monkeypatch, 64, method="sparsegpt", calibration=calib_windows)
    elif mode == "one pass, stock":
        _prune_stock_or_chunked(model, monkeypatch, None, method="sparsegpt", calibration=calib_windows)
    else:
        prune(model, method="sparsegpt", sparsity=0.6, calibration=calib_windows, batch_size=2, progress=False)
    with torch.no_grad():
        expected = model.model(input_ids=calib_windows, output_hidden_states=True).hidden_states
    assert len(propagated) == 3
    for index in range(2):
        torch.testing.assert_close(propagated[index], expected[index + 1], rtol=1e-4, atol=1e-5)


def test_a_forward_set_on_the_instance_survives_pruning(calib_windows):
    """The engine swaps blocks' and FFNs' forwards for the capture and the chunked FFN, then puts back
    what was there, including a forward set on the instance (where accelerate's hooks live)."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    block, mlp = model.model.layers[1], model.model.layers[0].mlp
    calls = []

    def wrap(module):
        own = module.forward

        def hooked(*args, **kwargs):
            calls.append(type(module).__name__)
            return own(*args, **kwargs)
        module.forward = hooked
        return hooked

    hooked_block, hooked_mlp = wrap(block), wrap(mlp)
    prune(model, method="sparsegpt", sparsity=0.5, calibration=calib_windows, progress=False)
    assert block.__dict__["forward"] is hooked_block and mlp.__dict__["forward"] is hooked_mlp
    calls.clear()
    logits(model, calib_windows)
    assert sorted(set(calls)) == ["LlamaDecoderLayer", "LlamaMLP"]


def test_capture_names_a_block_the_model_never_calls(calib_windows):
    from sparseforge.oneshot.engine import capture_block_inputs

    model = tiny_llama().eval()
    blocks = list(get_adapter(model).blocks)
    stray = type(blocks[0])(model.config, 0)  # a block the model does not run
    with pytest.raises(ModelError, match="block 2 was called 0 times for 2 batches"):
        capture_block_inputs(model, [*blocks, stray], list(calib_windows.split(2)))
