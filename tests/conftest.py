"""Fixtures shared by the tests; the builders live in tiny.py."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_MODELS, VOCAB


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    torch.manual_seed(0)
    model = TINY_MODELS[request.param]()
    model.eval()
    return model


@pytest.fixture
def calib_windows():
    return torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
