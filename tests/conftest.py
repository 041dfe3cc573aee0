"""Fixtures shared by the tests; the builders live in tiny.py."""

from __future__ import annotations

import os

# tiny problems run the element-wise SparseLLM solve eagerly; one test compiles it
os.environ.setdefault("SPARSEFORGE_COMPILE", "0")

import pytest  # noqa: E402
import torch

from tiny import TINY_MODELS, VOCAB


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    torch.manual_seed(0)
    model = TINY_MODELS[request.param]()
    model.eval()
    return model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest, and immune to a loaded machine's thread
    contention (two OpenMP threads spin-wait and run tiny matmuls ~20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def calib_windows():
    return torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smol_dir():
    """The embedded SmolLM2-135M, converted once to a safetensors directory in the cache."""
    from sparseforge.assets import embedded_model_gguf
    from sparseforge.loading import gguf_to_directory

    return gguf_to_directory(embedded_model_gguf())


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smol_dir):
    """A tiny random Llama saved as an HF directory, with SmolLM2's real tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state: a run that chose bf16 autocast (``--mixed-precision auto`` on a
    CPU with native bf16) would leave it to a later test's ``Accelerator(cpu=True)``. Every test starts afresh."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
