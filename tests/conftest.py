"""Shared fixtures. Builders and test-only grafts live in graft_fixtures.py (importable from tests)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from graft_fixtures import build_tiny_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["llama", "gemma3"])
def tiny_model(request):
    return build_tiny_model(request.param)
