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


@pytest.fixture(autouse=True)
def _aten_backend_unless_a_test_chooses():
    """Every test starts on the "aten" backend: the oracle tests hold bnlab to torch's own numbers and calls
    (bit for bit, and what __torch_function__ modes see). The compiled kernel and "auto" are tested where a
    test sets them (tests/test_compiled_batch_norm.py, tests/test_layer_contract.py), against torch and the
    NumPy reference at the tolerance the README states."""
    import bnlab.functional as BF

    before = BF.get_backend()
    BF.set_backend("aten")
    yield
    BF.set_backend(before)
