import os

# Keras must see its backend before its first import anywhere in the session.
os.environ.setdefault("KERAS_BACKEND", "torch")

import pytest
import torch
from hypothesis import settings

settings.register_profile("bnlab", max_examples=40, deadline=None, derandomize=True)
settings.load_profile("bnlab")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
