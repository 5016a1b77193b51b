"""Tests run offline on the CPU. Multi-device runs happen in subprocesses with their own XLA_FLAGS.

Every test gets one tier marker here, by the rules in `tier` (`make test-fast` runs `unit`):
  unit    in process, no script run;
  parity  in a file named *parity*: our models against the transformers PyTorch models;
  run     starts a training script: its main() in process, or a subprocess (tests/tiny.run_script and others);
  system  several processes as one job, the fake GCS server or the fake Hub.
A test marked by hand with one of them keeps it.
"""

import inspect
import os
import re

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The scripts cache compiled steps (flaxtrain/compilation_cache.py): the suite's go next to pytest's own cache, not
# into the user's ~/.cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
# The tests' models are tiny: XLA's optimising passes take most of a compilation and save nothing. Without them a
# script run compiles in about half the time and costs 30-50% less CPU (the flax lm1b example's tests do the same);
# numbers that tests compare come from runs that both compile this way. Subprocesses inherit it (tests/tiny.py).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Most of the suite's programs compile in under JAX's 1 s threshold for caching, and many runs compile the same
# ones (an uninterrupted run, then the stopped and the resumed run it must equal): cache them all.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

TIERS = ("unit", "parity", "run", "system")
# What a test's code (its function, its fixtures and the functions of its module that they call) says about it.
SYSTEM = re.compile(r"\bprocesses=(?!None)|\bFakeHub\(|\bgcs_server\(")
RUN = re.compile(r"\brun_script\(|\bsharded_runs\(|\bsubprocess\.|\w*flax\w*\.main\b")


def _code_of(item) -> str:
    """The source of a test, of the fixtures it uses that tests/ defines, and of the functions of its module that
    any of them calls (transitively)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    functions = [item.function] if hasattr(item, "function") else []
    for definitions in item._fixtureinfo.name2fixturedefs.values():
        functions += [d.func for d in definitions]
    module = getattr(item, "module", None)
    seen, sources = set(), []
    while functions:
        function = inspect.unwrap(functions.pop())
        code = getattr(function, "__code__", None)
        if code is None or function in seen or not os.path.abspath(code.co_filename).startswith(tests):
            continue
        seen.add(function)
        sources.append(inspect.getsource(function))
        names = set(code.co_names)
        for constant in code.co_consts:  # nested functions and lambdas
            names |= set(getattr(constant, "co_names", ()))
        functions += [getattr(module, name) for name in names if callable(getattr(module, name, None))]
    return "\n".join(sources)


def tier(item) -> str:
    code = _code_of(item)
    if SYSTEM.search(code) or "gcs_bucket" in item.fixturenames:
        return "system"
    if RUN.search(code):
        return "run"
    return "parity" if "parity" in item.path.name else "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(name) for name in TIERS):
            item.add_marker(tier(item))


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    """A folder per test module, for the checkpoints its tests share (the parity tests cache them by name)."""
    return str(tmp_path_factory.mktemp("checkpoints"))
