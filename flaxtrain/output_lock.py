"""A run owns its output_dir: it takes a lock there before any work, so that a second run into the same folder is
refused instead of silently mixing its checkpoints and results with the first's.

The lock is one hidden file, output_dir/.flaxtrain-lock.json (never pushed to the Hub), created only if absent
(locally with O_EXCL, in a bucket with a generation precondition), holding its owner: host, pid, the command,
when it started and a heartbeat that a background thread refreshes every HEARTBEAT_S while the run lives (through
tokenization as through training). A multi-host job holds one lock, taken by process 0 for every host.

A lock whose owner is gone is taken over:
  - on the same host, when its process no longer exists (killed, crashed): at once, with a warning;
  - from another host, whose process cannot be checked: with --take_over_output_dir, which the refusal names
    when the heartbeat is older than STALE_S (that host crashed or lost its disk).
The lock goes when the run ends, whatever the way; a kill -9 leaves it for the same host's next run to take over.
"""

import dataclasses
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Optional

import jax

from flaxtrain import parallel, storage

logger = logging.getLogger(__name__)

LOCK_FILE = ".flaxtrain-lock.json"
HEARTBEAT_S = 60
STALE_S = 10 * 60  # a heartbeat this old means its run is gone


@dataclasses.dataclass
class Owner:
    host: str
    pid: int
    started: str
    heartbeat: float  # UNIX time
    command: str
    id: str

    @classmethod
    def of_this_process(cls) -> "Owner":
        return cls(socket.gethostname(), os.getpid(), datetime.datetime.now().isoformat(timespec="seconds"),
                   time.time(), " ".join(sys.argv), uuid.uuid4().hex)

    def describe(self) -> str:
        age = max(0, round(time.time() - self.heartbeat))
        return (f"a run started {self.started} on host {self.host} (pid {self.pid}, last heartbeat {age} s ago: "
                f"`{self.command}`)")

    def is_gone_here(self) -> bool:
        """On this host, whether its process has ended (a pid that exists again is taken to be it)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # someone else's process
            return False
        return False


def _read(path: str) -> Optional[Owner]:
    try:
        return Owner(**json.loads(storage.read_text(path)))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # cut short by a kill while it was written: nobody's (pid -1)
        return Owner("?", -1, "?", 0.0, "?", "?")


def _create(path: str, owner: Owner) -> bool:
    """Writes the lock if there is none; False if there is one."""
    data = json.dumps(dataclasses.asdict(owner), indent=1).encode()
    if storage.is_remote(path):
        return storage.create_exclusive(path, data)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(descriptor, "wb") as f:
            f.write(data)
    except BaseException:  # (a Ctrl-C right now): no half-written lock left behind
        os.remove(path)
        raise
    return True


class OutputLock:
    """The lock of one run on its output_dir (process 0 holds the file; the other hosts hold nothing)."""

    def __init__(self, output_dir: str, take_over: bool = False):
        self.output_dir, self.path = output_dir, storage.join(output_dir, LOCK_FILE)
        self.owner, self.created_dir = None, False
        self._stop = threading.Event()
        error = ""
        if jax.process_index() == 0:
            try:
                self._take(take_over)
            except (ValueError, OSError) as e:
                error = (str(e) if isinstance(e, ValueError) else
                         f"--output_dir={output_dir}: cannot take its lock ({e}).")
        # Every host stops with process 0's refusal, rather than waiting for it in a later collective.
        if error := parallel.same_on_every_host(error):
            raise ValueError(error)
        if self.owner is not None:
            threading.Thread(target=self._beat, name="output-dir-heartbeat", daemon=True).start()

    def _take(self, take_over: bool):
        self.created_dir = not storage.is_remote(self.output_dir) and not os.path.isdir(self.output_dir)
        storage.makedirs(self.output_dir)
        mine = Owner.of_this_process()
        for _ in range(3):  # another run may come and go between our two looks
            if _create(self.path, mine):
                self.owner = mine
                return
            held = _read(self.path)
            if held is None:
                continue
            gone = held.pid < 0 or held.is_gone_here()  # (pid -1: a record cut short, nobody's)
            if gone or take_over:
                logger.warning("Taking over the lock of %s on %s: %s.", self.output_dir, held.describe(),
                               "its process has ended" if gone else "--take_over_output_dir")
                storage.remove(self.path)
                continue
            stale = time.time() - held.heartbeat > STALE_S
            raise ValueError(
                f"--output_dir={self.output_dir} is in use by {held.describe()}. Wait for it or choose another "
                f"--output_dir" + ("; that run looks gone (no heartbeat for over "
                                   f"{STALE_S // 60} minutes): take its place with --take_over_output_dir."
                                   if stale else "; if that run is gone (its host crashed), take its place with "
                                                 "--take_over_output_dir."))
        raise ValueError(f"--output_dir={self.output_dir}: could not take its lock (other runs keep taking it).")

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            held = _read(self.path)
            if held is None or held.id != self.owner.id:
                logger.error("The lock of %s was taken by %s: this run no longer owns its output_dir.",
                             self.output_dir, held.describe() if held else "nobody (it was removed)")
                return
            try:
                self.owner.heartbeat = time.time()
                storage.write_text(self.path, json.dumps(dataclasses.asdict(self.owner), indent=1))
            except OSError as e:  # a missed beat is no reason to stop training
                logger.warning("Could not refresh the lock of %s: %s", self.output_dir, e)

    def release(self):
        """Removes the lock (if it is still this run's) and an output_dir this run created and left empty."""
        self._stop.set()
        if self.owner is None:
            return
        held = _read(self.path)
        if held is not None and held.id == self.owner.id:
            storage.remove(self.path)
        if self.created_dir and os.path.isdir(self.output_dir) and not os.listdir(self.output_dir):
            os.rmdir(self.output_dir)
        self.owner = None
