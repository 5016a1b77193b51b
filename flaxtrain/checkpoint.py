"""Resumable training checkpoints with orbax, in `output_dir/checkpoints/STEP`.

A checkpoint holds the whole `TrainState` (params, optimizer state, step). Everything else a run needs to continue
exactly is a function of the step and the seed (data order, masking, dropout rngs), so nothing more is stored but
a little metadata to check that the resumed command is compatible. Orbax writes each step into a temporary
folder and renames it when complete, so a killed save is never taken as the latest checkpoint.
"""

import logging
import os
import shutil
from typing import Optional

import jax
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


def _latest_step(directory: str) -> Optional[int]:
    if not os.path.isdir(directory):
        return None
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    return manager.latest_step()


def resolve_start(training_args) -> Optional[tuple[str, int]]:
    """Decides whether a training run resumes, and checks the output directory before any work starts.

    Returns (checkpoints directory, step) to resume from, or None for a fresh start. A fresh start into a
    non-empty `output_dir` needs `--overwrite_output_dir`.
    """
    output_dir = training_args.output_dir
    own_dir = os.path.join(output_dir, CHECKPOINTS)
    choice = training_args.resume_from_checkpoint
    if choice and choice.lower() != "none":
        path = os.path.abspath(os.path.expanduser(choice))
        if os.path.basename(path).isdigit() and os.path.isdir(path):
            directory, step = os.path.dirname(path), int(os.path.basename(path))
        else:
            directory, step = path, _latest_step(path)
        if step is None:
            raise ValueError(f"--resume_from_checkpoint={choice}: not a checkpoint folder (expected "
                             f"OUTPUT_DIR/{CHECKPOINTS}/STEP or OUTPUT_DIR/{CHECKPOINTS}).")
        _drop_later_steps(own_dir, step)
        return directory, step
    if choice is None:
        step = _latest_step(own_dir)
        if step is not None:
            logger.warning("Resuming from the checkpoint of step %d in %s (pass --resume_from_checkpoint=none "
                           "--overwrite_output_dir to start over instead)", step, own_dir)
            return own_dir, step
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        if not training_args.overwrite_output_dir:
            raise ValueError(f"Output directory {output_dir} already exists and is not empty (and holds no checkpoint "
                             "to resume from). Use --overwrite_output_dir to train into it anyway.")
        if jax.process_index() == 0 and os.path.isdir(own_dir):
            shutil.rmtree(own_dir)  # --resume_from_checkpoint none: old checkpoints must not be resumed later.
    return None


def _drop_later_steps(directory: str, step: int):
    """Going back to `step` abandons the checkpoints after it: orbax would not save over them, and a later plain
    resume would pick them up."""
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.isdigit() and int(name) > step:
            logger.warning("Removing the checkpoint of step %s, after the one resumed from", name)
            shutil.rmtree(os.path.join(directory, name))


class Checkpoints:
    """Saves and restores the training state; every host calls every method (orbax coordinates them)."""

    def __init__(self, output_dir: str, max_to_keep: Optional[int] = None):
        self.directory = os.path.abspath(os.path.join(output_dir, CHECKPOINTS))
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        )

    def save(self, step: int, state, meta: dict):
        """Starts an asynchronous save; training goes on while it is written."""
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        )

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def restore(directory: str, step: int, state_like):
    """Restores (state, meta) saved at `step`, with the shapes, dtypes and shardings of `state_like`."""
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    manager.close()
    return restored.state, restored.meta


def restore_meta(directory: str, step: int) -> dict:
    """Only the metadata saved at `step` (cheap: checked before the state is restored)."""
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    manager.close()
    return meta
