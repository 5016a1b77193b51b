"""Where a run starts, decided before any work: fresh, from a checkpoint in output_dir, or (without --do_train)
from the model that a training run left in output_dir.

What a run is, is recorded with its checkpoints: every flag that changes the trained result
(`settings.run_flags`) and the examples per update. A run that resumes must have the same; a difference stops it
before any work, naming each flag with its saved and new value, unless --allow_changed_flags names it (a change on
purpose). Flags that only change cadence or reporting are listed by each flags dataclass in its `MAY_CHANGE` and
may change freely.
training_args.json holds one record per start of the run.
"""

import dataclasses
import datetime
import json
import logging
import os
import tempfile
from typing import Optional

import jax

from flaxtrain import checkpoint, storage
from flaxtrain.output_lock import LOCK_FILE
from flaxtrain.settings import BATCH, ModelSource

logger = logging.getLogger(__name__)

EXPORTED = ("config.json", "model.safetensors")
RECORD_FILE = "training_args.json"  # one record per start: record_start
START_OVER = "--resume_from_checkpoint=none --overwrite_output_dir"


@dataclasses.dataclass
class Resume:
    """A checkpoint to resume from, with its metadata, and the older checkpoints to fall back to."""

    directory: str
    step: int
    meta: dict
    older: list[int]


@dataclasses.dataclass
class Start:
    """Where a run starts (`checkpoint`; None: fresh) and what it records with its checkpoints (`record`)."""

    record: dict
    allowed: set
    output_dir: str
    overwrite: bool
    model: ModelSource  # the model to start from (evaluation alone: perhaps the one trained in output_dir)
    checkpoint: Optional[Resume] = None

    def check(self, resume: Resume, extra=()):
        check_same_run(resume.meta, self.record, self.allowed, storage.join(resume.directory, str(resume.step)),
                       extra)

    def fall_back(self, error: BaseException):
        """The state of `checkpoint` did not restore: sets it aside and takes the newest older one that reads and
        fits, or none (a fresh start, if output_dir allows one)."""
        resume = self.checkpoint
        checkpoint.set_aside(resume.directory, resume.step, error)
        self.checkpoint = first_readable(resume.directory, resume.older)
        if self.checkpoint is None:
            fresh_start(self.output_dir, self.overwrite, self.record)
        else:
            logger.warning("Resuming from the checkpoint of step %d instead.", self.checkpoint.step)
            self.check(self.checkpoint)


# ----------------------------------------------------------------------------------------- the same run
def differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(name, saved value, new value) of everything in `identity` that differs."""
    found = []
    if BATCH in saved and saved[BATCH]["value"] != current[BATCH]["value"]:
        found.append((BATCH, saved[BATCH]["how"], current[BATCH]["how"]))
    saved_flags = saved.get("flags", {})
    for name in sorted(set(saved_flags) | set(current["flags"])):
        old, new = saved_flags.get(name, "(not a flag then)"), current["flags"].get(name, "(not a flag now)")
        if old != new:
            found.append((name, old, new))
    return found


def check_same_run(saved: dict, current: dict, allowed: set, where: str, extra=()):
    """Raises ValueError naming every difference between a checkpoint's record and this run's that
    --allow_changed_flags does not allow; `extra` adds (name, saved, new) found elsewhere (e.g. train_examples)."""
    if "flags" not in saved:
        logger.warning("The checkpoint %s predates the record of its flags: they are not compared.", where)
    changed = [d for d in (*differences(saved, current), *extra) if "all" not in allowed and d[0] not in allowed]
    if changed:
        listing = "; ".join(f"{'--' if n in current['flags'] else ''}{n}: {old!r} then, {new!r} now"
                            for n, old, new in changed)
        names = ",".join(n for n, _, _ in changed)
        raise ValueError(f"This run differs from the one that saved {where}: {listing}. Run it with the flags it "
                         f"had, start over with {START_OVER}, or continue with the change on purpose with "
                         f"--allow_changed_flags={names}.")


def record_start(output_dir: str, start_step: Optional[int], flags: dict, identity: dict):
    """Appends this start (its step, time, devices, every flag but secrets, and what makes it this run: see
    settings.identity) to training_args.json."""
    if jax.process_index() != 0:
        return
    path = storage.join(output_dir, RECORD_FILE)
    records = json.loads(storage.read_text(path)) if storage.isfile(path) else []
    if isinstance(records, dict):  # written by an earlier version: the flags of one start
        records = [{"flags": records}]
    records.append({"resumed_from_step": start_step, "time": datetime.datetime.now().isoformat(timespec="seconds"),
                    "processes": jax.process_count(), "devices": jax.device_count(),
                    "flags": flags, "identity": identity})
    storage.write_text(path, json.dumps(records, indent=2, sort_keys=True))


# ------------------------------------------------------------------------------------------------ start
def start(identity: dict, output, model: ModelSource, *, do_train: bool) -> Start:
    """Checks output_dir (a settings.Output) and decides where this run starts (see the module doc): from a
    checkpoint, or fresh, or (evaluation or prediction only) from no checkpoint. Without training and
    --model_name_or_path, the model trained in output_dir is the one evaluated (Start.model points at it)."""
    output_dir = output.directory
    run = Start(identity, set(output.allowed_changes), output_dir, output.overwrite, model=model)
    if not do_train:
        run.model = _evaluate_trained_model(model, output)
        return run
    directory = checkpoint.directory_of(output_dir)
    choice = output.resume_from
    if choice and choice.lower() != "none":
        path = storage.absolute(choice)
        if storage.basename(path).isdigit() and storage.isdir(path):  # OUTPUT_DIR/checkpoints/STEP
            chosen, last = storage.parent(path), int(storage.basename(path))
        else:  # OUTPUT_DIR/checkpoints: its newest
            chosen, last = path, max(checkpoint.steps(path), default=None)
        if last is None:
            raise ValueError(f"--resume_from_checkpoint={choice}: not a checkpoint folder (expected "
                             f"OUTPUT_DIR/{checkpoint.CHECKPOINTS}/STEP or OUTPUT_DIR/{checkpoint.CHECKPOINTS}).")
        _drop_later_steps(directory, last)
        resume = first_readable(chosen, sorted({s for s in checkpoint.steps(chosen) if s < last} | {last}))
    elif choice is None:
        resume = first_readable(directory, checkpoint.steps(directory))
        if resume is not None:
            logger.warning("Resuming from the checkpoint of step %d in %s (pass %s to start over instead)",
                           resume.step, directory, START_OVER)
    else:
        resume = None
    if resume is None:
        fresh_start(output_dir, output.overwrite, identity)
    else:
        run.check(resume)
    run.checkpoint = resume
    return run


def first_readable(directory: str, candidates: list[int]) -> Optional[Resume]:
    """The newest of the checkpoints `candidates` (steps, oldest first) whose metadata reads; newer ones that do not
    read are set aside as damaged."""
    candidates = list(candidates)
    while candidates:
        step = candidates.pop()
        try:
            return Resume(directory, step, checkpoint.restore_meta(directory, step), candidates)
        except Exception as error:  # noqa: BLE001  (orbax and tensorstore raise many kinds)
            checkpoint.set_aside(directory, step, error)
    return None


def fresh_start(output_dir: str, overwrite: bool, identity: Optional[dict] = None):
    """A fresh start into a non-empty output_dir needs --overwrite_output_dir, unless what is there is the same
    run's, stopped before its first checkpoint (the same command starts it again); old checkpoints are removed
    then, so that they are never resumed later."""
    if [name for name in storage.listdir(output_dir) if name != LOCK_FILE]:
        if not (overwrite or _same_run_never_saved(output_dir, identity)):
            raise ValueError(f"Output directory {output_dir} already exists and is not empty (and holds no checkpoint "
                             "to resume from). Use --overwrite_output_dir to train into it anyway.")
        if jax.process_index() == 0:
            storage.remove(checkpoint.directory_of(output_dir))


def _same_run_never_saved(output_dir: str, identity: Optional[dict]) -> bool:
    """Whether output_dir's last recorded start was this same run, and no training run there ever finished."""
    path = storage.join(output_dir, RECORD_FILE)
    if identity is None or not storage.isfile(path) or storage.isfile(storage.join(output_dir, EXPORTED[1])):
        return False
    try:
        records = json.loads(storage.read_text(path))
    except ValueError:
        return False
    last = records[-1] if isinstance(records, list) and records else {}
    if last.get("identity") is None or differences(last["identity"], identity):
        return False
    logger.warning("%s holds a start of this same run that stopped before its first checkpoint: starting it again.",
                   output_dir)
    return True


def _drop_later_steps(directory: str, step: int):
    """Going back to `step` abandons the checkpoints after it: orbax would not save over them, and a later plain
    resume would pick them up."""
    if jax.process_index() != 0:
        return
    for name in storage.listdir(directory):
        if name.isdigit() and int(name) > step:
            logger.warning("Removing the checkpoint of step %s, after the one resumed from", name)
            storage.remove(storage.join(directory, name))


def check_writable(output_dir: str):
    """--output_dir must be a folder this process may write in (or one it may create): checked before any work,
    without leaving anything behind."""
    if storage.is_remote(output_dir):
        return  # a bucket is checked by its first write; probing it here would need credentials twice
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir={output_dir} is a file, not a folder.")
    existing = output_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--output_dir={output_dir}: {existing} is a file, not a folder.")
    try:
        descriptor, probe = tempfile.mkstemp(dir=existing, prefix=".flaxtrain-write-test.")
        os.close(descriptor)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--output_dir={output_dir}: cannot write in {existing} ({e.strerror}).") from None


def _evaluate_trained_model(model: ModelSource, output) -> ModelSource:
    """Evaluation or prediction alone: without --model_name_or_path, the model trained in output_dir; with another
    model, never over a finished training run's results."""
    output_dir = output.directory
    trained = all(storage.isfile(storage.join(output_dir, name)) for name in EXPORTED)
    if model.name_or_path is None and trained:
        logger.warning("Evaluating the model trained in %s (its config and tokenizer too; pass --model_name_or_path "
                       "to evaluate another).", output_dir)
        return dataclasses.replace(model, name_or_path=output_dir, config_name=None, tokenizer_name=None)
    other = model.name_or_path and storage.absolute(model.name_or_path) != output_dir
    if other and storage.isfile(storage.join(output_dir, "train_results.json")) and not output.overwrite:
        raise ValueError(f"--output_dir={output_dir} holds a finished training run: evaluating "
                         f"--model_name_or_path={model.name_or_path} there would replace its results. "
                         "Choose another --output_dir, or leave out --model_name_or_path to evaluate the model "
                         "trained there.")
    return model
