"""Stopping cleanly on SIGTERM (what a TPU VM or a cluster scheduler sends before it takes the machine away) and
SIGINT (Ctrl-C).

While the training loop runs, the first signal asks it to stop: the loop finishes the step in flight, saves a
checkpoint of it and the exported model, and exits with 128 + the signal's number. Later signals are logged and
ignored, so a second Ctrl-C cannot cut the save short (kill -9 still can; orbax never takes an interrupted save for
a checkpoint, and the previous one stays).

On several hosts a signal may reach one host, or reach them at different steps, but every host must stop after
the same step (the save is collective). After each step every host contributes its flag to a one-number max over
all devices; the loop reads that answer one step late, so the host never waits for the step it just dispatched:
the answer for step k is the same everywhere, and every host stops after step k + 1. A host whose input ran out
raises the same flag with OUT_OF_DATA, larger than any signal's number, so that every host stops after the same
step then too.
"""

import logging
import signal
import threading

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
OUT_OF_DATA = 1000  # should_stop's answer when some host's input ran out


class Preempted(SystemExit):
    """Raised by the training loop after it saved on a signal; exits the process with 128 + the signal number."""


class StopSignal:
    """A context that catches SIGTERM and SIGINT while training runs; `should_stop()` after each step."""

    def __init__(self, mesh):
        self.signum = 0  # the first signal received on this host
        self.ran_out = False
        self.previous, self.pending = {}, None
        if jax.process_count() > 1:
            flat = NamedSharding(mesh, P(mesh.axis_names))  # one element per device, over every mesh axis
            self.sharding, self.agree = flat, jax.jit(lambda flags: flags.max(), out_shardings=NamedSharding(mesh, P()))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # (signal handlers can only be set there)
            for signum in SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum:
            logger.warning("%s received again: still stopping and saving; ignored (kill -9 would lose this save, "
                           "not the previous checkpoint).", name)
            return
        self.signum = signum
        logger.warning("%s received: finishing the step in flight, then saving a checkpoint and stopping.", name)

    def out_of_data(self):
        """This host's input ran out (it trains on a batch of weight zero until every host knows)."""
        self.ran_out = True

    def should_stop(self) -> int:
        """Called once after every step. The signal number to stop with after this step, OUT_OF_DATA, or 0 to go
        on; the same answer on every host."""
        flag = OUT_OF_DATA if self.ran_out else self.signum
        if jax.process_count() == 1:
            return flag
        local = np.full(len(self.sharding.addressable_devices), flag, np.int32)
        flags = jax.make_array_from_process_local_data(self.sharding, local, (jax.device_count(),))
        answer, self.pending = self.pending, self.agree(flags)
        return 0 if answer is None else int(answer.addressable_data(0))
