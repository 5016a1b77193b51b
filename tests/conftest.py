"""Tests run offline on the CPU. Multi-device runs happen in subprocesses with their own XLA_FLAGS."""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The scripts cache compiled steps (flaxtrain/compilation_cache.py): the suite's go next to pytest's own cache, not
# into the user's ~/.cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    """A folder per test module, for the checkpoints its tests share (the parity tests cache them by name)."""
    return str(tmp_path_factory.mktemp("checkpoints"))
