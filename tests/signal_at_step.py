"""`python tests/signal_at_step.py SCRIPT FLAGS...` runs a training script as `python SCRIPT FLAGS...` would, and sends
the process a real signal when the training loop has finished a given step, so that a test knows where it lands:

  SIGNAL_AT_STEP   the step after which the signal is sent
  SIGNAL_NAME      SIGTERM (default) or SIGINT
  SIGNAL_PROCESS   in a multi-host run, the only process index that gets it (default: all)
  SIGNAL_AGAIN     if set, the same signal again as the save it causes starts (a second Ctrl-C)

It prints "signal sent at UNIX_TIME" on stderr, so the test can time how long the process takes to exit.
"""

import os
import runpy
import signal
import sys
import time

import jax

from flaxtrain import checkpoint, reporting


def main():
    script, sys.argv = sys.argv[1], sys.argv[1:]
    at, signum = int(os.environ["SIGNAL_AT_STEP"]), getattr(signal, os.environ.get("SIGNAL_NAME", "SIGTERM"))
    process = os.environ.get("SIGNAL_PROCESS")
    sent = []

    def send():
        if process is None or jax.process_index() == int(process):
            print(f"signal sent at {time.time()}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signum)
            sent.append(signum)

    start, add = reporting.TrainProgress.__init__, reporting.TrainProgress.add

    def count_from_start(self, *args, **kwargs):
        start(self, *args, **kwargs)
        self.steps_done = self.last_step

    def add_and_signal(self, metrics):  # called once after every step
        add(self, metrics)
        self.steps_done += 1
        if self.steps_done == at:
            send()

    reporting.TrainProgress.__init__, reporting.TrainProgress.add = count_from_start, add_and_signal
    if os.environ.get("SIGNAL_AGAIN"):
        save = checkpoint.Checkpoints.save

        def signal_again_then_save(self, *args, **kwargs):
            if sent:
                send()
            save(self, *args, **kwargs)

        checkpoint.Checkpoints.save = signal_again_then_save
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
