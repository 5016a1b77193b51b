"""flaxtrain/phases.py: each second counted once, in the phase running then; compiles counted in the phase that
triggered them; the one log line that benchmarks/bench_recipes.py reads."""

import json
import time

import jax
import jax.numpy as jnp

from flaxtrain import phases


def test_time_goes_to_the_running_phase_and_compiles_to_the_phase_that_triggered_them(caplog):
    clock = phases.Phases("start-up")
    time.sleep(0.05)
    clock.switch("train")
    with clock.within("evaluate"):
        jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.234)(jnp.arange(7.0)).block_until_ready()  # a fresh program
        time.sleep(0.05)
    timed = clock.timed("export", lambda: time.sleep(0.05) or "saved")
    assert timed() == "saved" and clock.timed("x", None) is None
    time.sleep(0.05)  # back in "train"
    with caplog.at_level("INFO"):
        figures = clock.report()
    clock.close()
    assert set(figures) >= {"start-up", "train", "evaluate", "export", "total"}
    for phase in ("start-up", "train", "evaluate", "export"):
        assert figures[phase] >= 0.05, figures
    assert figures["evaluate compile"] > 0 and "train compile" not in figures, figures
    assert abs(figures["total"] - sum(v for k, v in figures.items() if k != "total" and "compile" not in k)) < 0.05
    logged = next(r.getMessage() for r in caplog.records if phases.PREFIX in r.getMessage())
    assert json.loads(logged.split(phases.PREFIX, 1)[1]) == figures


def test_closed_clock_hears_no_more_compiles():
    clock = phases.Phases("a")
    clock.close()
    clock.close()  # (a job that failed closes it once in __exit__, after finish may have)
    jax.jit(lambda x: jnp.cos(x) * 5.0 - 0.25)(jnp.arange(3.0)).block_until_ready()
    assert clock.compile_seconds == {}
