"""Where a run's wall time went, phase by phase, said in one log line at its end.

A user waits for the whole recipe, not for a step: start-up, reading and tokenizing the data, building the state,
training, evaluating, generating, saving. lifecycle.Job switches phases as the run goes through them (a script
names the ones only it knows, e.g. `with job.phases.within("predict")`), and each second of wall time is counted
once, in the phase running then. JAX's compiles (tracing, lowering, XLA) are counted inside whichever phase
triggered them, and said beside it. benchmarks/bench_recipes.py reads the line.
"""

import json
import logging
import time
from contextlib import contextmanager

import jax

logger = logging.getLogger(__name__)

PREFIX = "Where the time went (s): "
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class Phases:
    def __init__(self, first: str):
        self.seconds: dict[str, float] = {}
        self.compile_seconds: dict[str, float] = {}
        self.current, self.since = first, time.perf_counter()
        jax.monitoring.register_event_duration_secs_listener(self._compiled)
        self._listening = True

    def _compiled(self, event: str, duration: float, **_):
        if event in _COMPILE_EVENTS:
            self.compile_seconds[self.current] = self.compile_seconds.get(self.current, 0.0) + duration

    def switch(self, phase: str) -> str:
        """Counts the time so far to the current phase and starts `phase`; returns the one it ended."""
        now = time.perf_counter()
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.since
        ended, self.current, self.since = self.current, phase, now
        return ended

    @contextmanager
    def within(self, phase: str):
        """`phase` for the time of the block, then the phase that was running before it."""
        before = self.switch(phase)
        try:
            yield
        finally:
            self.switch(before)

    def timed(self, phase: str, fn):
        """`fn` with its calls counted to `phase` (None stays None)."""
        if fn is None:
            return None

        def timed_fn(*args, **kwargs):
            with self.within(phase):
                return fn(*args, **kwargs)
        return timed_fn

    def close(self):
        """Stops listening to JAX's compiles (the listeners are global: a process may run many jobs)."""
        if self._listening:
            jax.monitoring.unregister_event_duration_listener(self._compiled)
            self._listening = False

    def report(self) -> dict:
        """{phase: seconds, "<phase> compile": seconds of it compiling, "total": seconds}; also logged."""
        self.switch(self.current)
        figures = {}
        for phase, seconds in self.seconds.items():
            figures[phase] = round(seconds, 2)
            if self.compile_seconds.get(phase, 0.0) >= 0.01:
                figures[f"{phase} compile"] = round(self.compile_seconds[phase], 2)
        figures["total"] = round(sum(self.seconds.values()), 2)
        logger.info("%s%s", PREFIX, json.dumps(figures))
        return figures
