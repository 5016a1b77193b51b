"""Resumable training checkpoints with orbax, in `output_dir/checkpoints/STEP` (a local folder or a bucket URL).

A checkpoint holds the whole `TrainState` (params, optimizer state, step) and a little JSON metadata: the flags
that make the run what it is (checked when a run resumes, see `resume.py`), the progress since the last log line
and the best-model record; a streaming run adds the position of each host's input (`input/process_I-of-N.json`,
Grain's iterator state). Everything else a run needs to continue exactly is a function of the step and the seed
(the data order and masks of in-memory data, dropout rngs). Orbax writes each step under a temporary name and
renames it when complete (in a bucket: writes a commit marker last), so a killed save is never taken as a
checkpoint.
"""

import logging
from typing import Optional

import grain.checkpoint
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store

from flaxtrain import storage
from flaxtrain.reporting import finite_json

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
DAMAGED = ".damaged"  # suffix of a checkpoint folder set aside because it does not restore

MIN_SLICE_BYTES = 4 << 20


def _write_small_arrays_whole():
    """Orbax writes an array that is whole on several devices in slices, one a replica, so that hosts share the
    writing of replicated weights; each slice is a jitted op compiled for its shape. Below a few MiB a slice saves
    nothing and its compile costs more than the write (3 of the 20 s of a tiny run's first save on 8 devices)."""
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES,
                                             array_metadata_store=array_metadata_store.Store())  # (as orbax's own)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # (orbax warns that this replaces its default handler: that is the point)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl.setLevel(level)


_write_small_arrays_whole()


def directory_of(output_dir: str) -> str:
    return storage.join(storage.absolute(output_dir), CHECKPOINTS)  # orbax wants absolute paths


def _reader(directory: str):
    return ocp.CheckpointManager(storage.absolute(directory),
                                 options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def steps(directory: str) -> list[int]:
    """The complete checkpoints in `directory`, oldest first (interrupted saves are not listed)."""
    if not storage.isdir(directory):
        return []
    manager = _reader(directory)
    found = sorted(manager.all_steps())
    manager.close()
    return found


class Checkpoints:
    """Saves the training state; every host calls every method (orbax coordinates them)."""

    def __init__(self, output_dir: str, max_to_keep: Optional[int] = None):
        self.directory = directory_of(output_dir)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        )

    def save(self, step: int, state, meta: dict, input_iterator=None):
        """Starts an asynchronous save; training goes on while it is written. `input_iterator`: a Grain iterator
        whose position (this host's) is saved with the state."""
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(finite_json(meta)))
        if input_iterator is not None:
            items["input"] = grain.checkpoint.CheckpointSave(input_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def restore(directory: str, step: int, state_like):
    """Restores (state, meta) saved at `step`, with the shapes, dtypes and shardings of `state_like` (arrays or
    jax.ShapeDtypeStructs with shardings): onto this run's mesh, whatever mesh saved it."""
    manager = _reader(directory)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
    finally:
        manager.close()
    return restored.state, restored.meta


def restore_input(directory: str, step: int, input_iterator):
    """Puts `input_iterator` (a Grain iterator, built as the saving run built it) where this host's input stood
    at `step`. Each host saved its own position, so the run must resume on as many hosts as saved it."""
    folder = storage.join(directory, str(step), "input")
    saved = [name for name in storage.listdir(folder) if name.startswith("process_")]
    if not saved:
        raise ValueError(f"The checkpoint {storage.join(directory, str(step))} holds no input position (it was not "
                         "saved by a --streaming run).")
    hosts = int(saved[0].rsplit("-of-", 1)[1].split(".")[0])
    if hosts != jax.process_count():
        raise ValueError(f"The checkpoint {storage.join(directory, str(step))} was saved by {hosts} hosts and this "
                         f"run has {jax.process_count()}: a --streaming run resumes on as many hosts as it started "
                         "on (each host's input position is its own), or starts again with --resume_from_checkpoint"
                         "=none.")
    manager = _reader(directory)
    try:
        manager.restore(step, args=ocp.args.Composite(input=grain.checkpoint.CheckpointRestore(input_iterator)))
    finally:
        manager.close()


def restore_meta(directory: str, step: int) -> dict:
    """Only the metadata saved at `step` (cheap: checked before the state is restored)."""
    manager = _reader(directory)
    try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    finally:
        manager.close()


def problem(error: BaseException) -> str:
    """One line about why a checkpoint did not restore (tensorstore's errors run to a hundred lines)."""
    def first_line(e):
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return (lines[0] if lines else "").split(" See full TensorStore details")[0]  # (a repr of a C++ method)

    text = first_line(error)
    if error.__cause__ is not None:  # tensorstore's own status (NOT_FOUND, DATA_LOSS...) is often the cause
        text += f" <- {type(error.__cause__).__name__}: {first_line(error.__cause__)}"
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def set_aside(directory: str, step: int, error: BaseException):
    """Renames the checkpoint of `step`, which does not restore, to STEP.damaged (kept for a look, never resumed
    from again), saying what is wrong in one line."""
    logger.error("The checkpoint %s does not restore (%s): moved aside to %s%s.", storage.join(directory, str(step)),
                 problem(error), step, DAMAGED)
    if jax.process_index() == 0:
        target = storage.join(directory, f"{step}{DAMAGED}")
        storage.remove(target)  # an earlier damaged copy of the same step
        storage.move(storage.join(directory, str(step)), target)
