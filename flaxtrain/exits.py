"""How a script ends when it does not finish: one line for what the suite refuses on purpose, "interrupted" for a
signal at any phase, a traceback only for what nobody expected.

A refusal is a ValueError, FileNotFoundError or RuntimeError raised by the suite's own code (a `raise` in
flaxtrain/ or a run_*.py script): its message names the flag or file and what to do, and a traceback would only
bury it. The same types raised inside a library keep their traceback, as does everything else. FLAXTRAIN_DEBUG=1
shows every traceback.
"""

import logging
import os
import signal
import sys
import threading
import traceback

from flaxtrain import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFUSALS = (ValueError, FileNotFoundError, RuntimeError)
EXIT_REFUSED = 1

_interrupted_by = []  # the signal number that raised the KeyboardInterrupt in flight


def interrupts_raise():
    """SIGTERM outside the training loop raises KeyboardInterrupt, as SIGINT does, so that a run stopped while it
    loads or tokenizes unwinds (its lock released) and says so. The loop catches both itself (preemption.py).
    Also quiets what Python could only print as "Exception ignored" after such a signal or a failed restore."""
    def interrupt(signum, frame):
        _interrupted_by.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # (signal handlers can only be set there)
        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)
    sys.unraisablehook = _quiet_leftovers


def _quiet_leftovers(unraisable, default=sys.unraisablehook):
    """Drops two harmless "Exception ignored" tracebacks:
    - a signal that landed while a finalizer (__del__, a weakref callback) ran: stop_if_interrupted acts on it;
    - "Event loop is closed" from tensorstore's reads still in flight when the restore of a damaged checkpoint
      failed and orbax closed its event loop (one per array, a hundred lines): checkpoint.set_aside says what
      failed in one line."""
    error = unraisable.exc_value
    if isinstance(error, KeyboardInterrupt) or (isinstance(error, RuntimeError)
                                                and str(error) == "Event loop is closed"):
        return
    default(unraisable)


def stop_if_interrupted():
    """Raises the KeyboardInterrupt of a signal whose first one did not reach us: a finalizer or a library's broad
    `except` took it. Called between the phases of a run, so that such a signal still stops it before training."""
    if _interrupted_by:
        raise KeyboardInterrupt


def _ours(error: BaseException) -> bool:
    """Whether the innermost frame of `error`'s traceback is the suite's own code (flaxtrain/ or a script)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    path = os.path.abspath(frames[-1].filename)
    return path.startswith(os.path.join(ROOT, "flaxtrain") + os.sep) or (
        os.path.dirname(path) == ROOT and os.path.basename(path).startswith("run_"))


def _interrupt_in(error: BaseException):
    """The KeyboardInterrupt `error` is or wraps (datasets reports a Ctrl-C in its workers as its own error)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def run(main):
    """Calls `main()` and exits the process as the module doc says."""
    try:
        main()
    except preemption.Preempted:  # stopped by a signal during training, after saving: the loop said so
        raise
    except BaseException as error:  # noqa: BLE001
        if os.environ.get("FLAXTRAIN_DEBUG") or isinstance(error, SystemExit):
            raise
        log = logging.getLogger("flaxtrain")
        if _interrupted_by or _interrupt_in(error) is not None:  # (whatever a library made of the signal)
            signum = _interrupted_by[-1] if _interrupted_by else signal.SIGINT
            log.error("Interrupted by %s before training finished, after its last checkpoint (if any): run the "
                      "same command to go on.", signal.Signals(signum).name)
            sys.exit(128 + signum)
        if isinstance(error, REFUSALS) and _ours(error):
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(EXIT_REFUSED)
        raise
