"""--push_to_hub: the repo is opened before training, and the output directory is pushed in the background.

What goes up: every file at the top of output_dir that is not hidden (config.json, model.safetensors, the tokenizer
files, TensorBoard event files, log_history.jsonl, training_args.json (no secrets), the results files, README.md);
never checkpoints/ or best_model/. With `--hub_strategy`:
  every_save  at every --save_steps save and at the end (the default);
  end         only at the end;
  checkpoint  as every_save, plus the orbax training state of the save under `last-checkpoint/STEP/` (replaced
              each time), so that a run started elsewhere with the same --hub_model_id resumes from it.

Training never waits for the network: `push` takes a snapshot of the files (small ones read into memory, large ones
kept open, so a later save that replaces them does not change what is sent) and a background thread commits it.
A failed commit is retried with backoff and then logged; it never stops training. `finish` writes the model card,
pushes the final state, waits for every upload and raises if the final one failed: the run then exits non-zero,
with everything still in output_dir.

Hosts: process 0 opens the repo and uploads. With `--hub_strategy checkpoint` and no checkpoint in output_dir,
process 0 downloads the pushed training state into output_dir/checkpoints; then every other host that does not see
it there (output_dir not on a shared file system) downloads it too, so all hosts resume from the same step.
"""

import logging
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import jax

from flaxtrain import checkpoint, model_card, parallel, storage

logger = logging.getLogger(__name__)

REMOTE_CHECKPOINT = "last-checkpoint"
NOT_PUSHED = (checkpoint.CHECKPOINTS, "best_model")
IN_MEMORY_BYTES = 10 * 2**20  # files below this are read at push time; larger ones are kept open
RETRIES, BACKOFF_S = 4, 1.0  # waits 1, 2, 4, 8 s between attempts
CHECKPOINT_WAIT_S = 3600  # how long the uploader waits for orbax to finish writing a checkpoint


@dataclass
class _Push:
    message: str
    files: dict  # path in repo -> bytes or an open binary file
    checkpoint_step: Optional[int] = None
    final: bool = False
    opened: list = field(default_factory=list)

    def close(self):
        for f in self.opened:
            f.close()


class HubRepo:
    """An opened Hub repo and its background uploader (process 0 only)."""

    def __init__(self, api, repo_id: str, output_dir: str, strategy: str, remote_checkpoint: set):
        self.api, self.repo_id, self.output_dir, self.strategy = api, repo_id, output_dir, strategy
        self.url = f"{api.endpoint}/{repo_id}"
        self.remote_checkpoint = set(remote_checkpoint)  # files under last-checkpoint/ on the Hub now
        self.last_step, self.final_ok, self.failed = None, None, []
        self.jobs = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="hub-upload", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------------- training thread
    def push(self, step: int):
        """Called by the loop after each save (checkpoint started, model exported): queues a push of step `step`."""
        self.last_step = step
        if self.strategy == "end":
            return
        try:
            files, opened = _snapshot(self.output_dir)
        except OSError as e:  # a push is never worth stopping training for
            logger.error("Hub: could not read %s for the push of step %d: %s", self.output_dir, step, e)
            return
        with_state = self.strategy == "checkpoint"
        message = f"Step {step}: {_describe(files, with_state)}"
        self.jobs.put(_Push(message, files, step if with_state else None, opened=opened))

    def push_final(self):
        """Queues the final push; with --hub_strategy checkpoint it carries the last save's training state too
        (the push of that save may have been skipped for this one)."""
        files, opened = _snapshot(self.output_dir)
        state_step = self.last_step if self.strategy == "checkpoint" else None
        step = f"Step {self.last_step} (end of training)" if self.last_step is not None else "End of run"
        message = f"{step}: {_describe(files, state_step is not None)}"
        self.jobs.put(_Push(message, files, state_step, final=True, opened=opened))

    def close(self) -> bool:
        """Waits for every queued push; returns whether the final one arrived."""
        self.jobs.put(None)
        self.thread.join()
        return bool(self.final_ok)

    # ------------------------------------------------------------------------------------- upload thread
    def _work(self):
        while (job := self.jobs.get()) is not None:
            try:
                if not job.final and self.jobs.qsize() > 0:
                    logger.info("Hub: skipping the push '%s', a newer one is queued", job.message)
                    continue
                ok = self._commit(job)
                if job.final:
                    self.final_ok = ok
            except Exception:  # never let the uploader die: later pushes may still work
                logger.exception("Hub: the push '%s' failed", job.message)
            finally:
                job.close()

    def _commit(self, job: _Push) -> bool:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        files, deleted, opened, state = dict(job.files), [], [], None
        if job.checkpoint_step is not None:
            state = self._checkpoint_files(job.checkpoint_step, opened)
            if state is None:
                job.message = job.message.replace(", training state", "")
            else:
                files.update(state)
                # The folder is replaced: the previous step's files go in the same commit.
                deleted = sorted(self.remote_checkpoint - set(state))
        try:
            for attempt in range(RETRIES + 1):
                try:
                    operations = [CommitOperationDelete(path) for path in deleted]
                    for path, source in files.items():
                        if not isinstance(source, bytes):
                            source.seek(0)
                        operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=source))
                    self.api.create_commit(self.repo_id, operations=operations, commit_message=job.message)
                    if state is not None:
                        self.remote_checkpoint = set(state)
                    logger.info("Hub: pushed '%s' to %s", job.message, self.url)
                    return True
                except Exception as e:  # network, server or file errors alike: retry, then report
                    if attempt == RETRIES:
                        logger.error("Hub: the push '%s' to %s failed after %d attempts: %s", job.message, self.url,
                                     RETRIES + 1, e)
                        self.failed.append(job.message)
                        return False
                    wait = BACKOFF_S * 2**attempt
                    logger.warning("Hub: the push '%s' failed (%s); retrying in %.0f s", job.message, e, wait)
                    time.sleep(wait)
        finally:
            for f in opened:
                f.close()

    def _checkpoint_files(self, step: int, opened: list) -> Optional[dict]:
        """The files of checkpoints/STEP as last-checkpoint/STEP/..., once orbax has finished writing them
        (it writes into a temporary folder and renames it when complete)."""
        directory = storage.join(checkpoint.directory_of(self.output_dir), str(step))
        deadline = time.monotonic() + CHECKPOINT_WAIT_S
        while not storage.isdir(directory):
            if time.monotonic() > deadline:
                logger.error("Hub: the checkpoint of step %d never appeared in %s; not pushed", step, directory)
                return None
            time.sleep(0.2)
        files = {}
        try:
            for rel in storage.files_under(directory):
                files[f"{REMOTE_CHECKPOINT}/{step}/{rel}"] = _read_or_open(storage.join(directory, rel), opened)
        except FileNotFoundError:  # save_total_limit removed it meanwhile: a newer push carries a newer one
            files = {}
        if not files:  # (a listing of a folder removed meanwhile is empty)
            logger.warning("Hub: the checkpoint of step %d was removed before it could be pushed", step)
            return None
        return files


def _read_or_open(path: str, opened: list):
    if storage.size(path) < IN_MEMORY_BYTES:
        return storage.read_bytes(path)
    f = storage.open_read(path)  # an open file keeps its content when a later save replaces the path
    opened.append(f)
    return f


def _snapshot(output_dir: str) -> tuple[dict, list]:
    """{name: bytes or open file} of every pushed file in output_dir, and the files it opened."""
    files, opened = {}, []
    for name in storage.listdir(output_dir):
        path = storage.join(output_dir, name)
        if name.startswith(".") or name in NOT_PUSHED or not storage.isfile(path):
            continue
        try:
            files[name] = _read_or_open(path, opened)
        except FileNotFoundError:  # replaced at this moment (a temporary file renamed)
            pass
    return files, opened


def _describe(files: dict, with_state: bool) -> str:
    """'weights, logs, eval, ...': what a push carries, for its commit message."""
    names = set(files)
    parts = [("weights", "model.safetensors" in names),
             ("logs", any(n.startswith("events.out.tfevents") or n == "log_history.jsonl" for n in names)),
             ("results", "train_results.json" in names),
             ("eval", "eval_results.json" in names),
             ("test", "test_results.json" in names),
             ("model card", "README.md" in names),
             ("training state", with_state)]
    return ", ".join(what for what, present in parts if present) or "nothing new"


# ------------------------------------------------------------------------------------------------- connect
def connect(target, output, do_train: bool) -> Optional[HubRepo]:
    """Opens the repo of --push_to_hub before any work, so a bad token or name fails in seconds.

    Call on every process before resume.start (it may download the training state that resume.start then finds).
    target: a settings.HubTarget (None: no --push_to_hub), output: the settings.Output. Returns the HubRepo on
    process 0, None elsewhere or without --push_to_hub.
    """
    if target is None:
        return None
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ValueError("--push_to_hub needs the network, but HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set.")
    token = target.token or get_token()
    api = HfApi(token=token, library_name="flaxtrain")
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per HTTP request otherwise
    repo_id, remote, download, error = "", set(), "", ""
    if jax.process_index() == 0:  # decides for every host, so that they all take the same path below
        try:
            if not token:  # other hosts only download, which a public repo allows
                raise ValueError("--push_to_hub needs a Hugging Face token that may write: pass --hub_token, set "
                                 "HF_TOKEN or log in with `hf auth login`.")
            repo_id = _open_repo(api, target, output.directory)
            if target.strategy == "checkpoint":
                remote = _remote_checkpoint_files(api, repo_id)
                download = "yes" if remote and _should_download(output, do_train) else ""
        except ValueError as e:
            error = str(e)
        except httpx2.TransportError as e:  # no server there, a name that does not resolve, a timeout
            error = (f"--push_to_hub: cannot reach the Hub at {api.endpoint} ({type(e).__name__}: "
                     f"{' '.join(str(e).split())}). Check the network, or HF_ENDPOINT if you set it.")
    # Every host fails with process 0's error, rather than waiting for it in the broadcasts below.
    if error := parallel.same_on_every_host(error):
        raise ValueError(error)
    repo_id, download = parallel.same_on_every_host(repo_id), parallel.same_on_every_host(download)
    if download:
        _download_checkpoint(api, repo_id, output.directory)
    if jax.process_index() != 0:
        return None
    logger.info("Pushing to %s/%s (--hub_strategy %s)", api.endpoint, repo_id, target.strategy)
    return HubRepo(api, repo_id, output.directory, target.strategy, remote)


def _open_repo(api, target, output_dir: str) -> str:
    """Checks the token, creates (or finds) the repo and checks that we may write to it. Returns its id."""
    from huggingface_hub.errors import HfHubHTTPError

    source = ("--hub_token" if target.token else "HF_TOKEN" if os.environ.get("HF_TOKEN")
              else "the saved login (hf auth login)")
    try:
        user = api.whoami()["name"]
    except HfHubHTTPError as e:
        raise ValueError(f"--push_to_hub: the Hub at {api.endpoint} refused the token from {source} "
                         f"({_status(e)}). Pass a valid token with write access with --hub_token.") from None
    name = target.model_id or storage.basename(output_dir)
    repo_id = name if "/" in name else f"{user}/{name}"
    try:
        api.create_repo(repo_id, private=target.private or None, exist_ok=True)
        api.auth_check(repo_id, write=True)
    except HfHubHTTPError as e:
        raise ValueError(f"--hub_model_id: cannot write to the Hub repo {repo_id} with the token from {source} "
                         f"({_status(e)}). Choose a repo in your namespace ({user}/...) or an organisation you may "
                         "write to, or a token with write access.") from None
    return repo_id


def _status(error) -> str:
    """'401: Invalid credentials ...' without the request headers (which carry the token)."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", "?")
    return f"HTTP {status}: {str(error).splitlines()[0]}"


def _remote_checkpoint_files(api, repo_id: str) -> set:
    return {p for p in api.list_repo_files(repo_id) if p.startswith(REMOTE_CHECKPOINT + "/")}


def _local_checkpoint(output_dir: str) -> bool:
    return any(name.isdigit() for name in storage.listdir(checkpoint.directory_of(output_dir)))


def _should_download(output, do_train: bool) -> bool:
    """Only a training run's plain start (no --resume_from_checkpoint choice) with no checkpoint of its own takes
    the Hub's."""
    return do_train and output.resume_from is None and not _local_checkpoint(output.directory)


def _download_checkpoint(api, repo_id: str, output_dir: str):
    """Fetches last-checkpoint/STEP (and the logs, so the curves go on) into output_dir, process 0 first; then
    the other hosts that do not see it (no shared file system) fetch it themselves."""
    if jax.process_index() == 0:
        _fetch(api, repo_id, output_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("flaxtrain.hub: checkpoint downloaded")
        if jax.process_index() != 0 and not _local_checkpoint(output_dir):
            _fetch(api, repo_id, output_dir)


def _fetch(api, repo_id: str, output_dir: str):
    remote = storage.is_remote(output_dir)
    storage.makedirs(output_dir)
    # Hidden (never pushed), and in output_dir when it is local, so that moving the checkpoint in is a rename.
    with tempfile.TemporaryDirectory(prefix=".hub-download-", dir=None if remote else output_dir) as staging:
        api.snapshot_download(repo_id, local_dir=staging,
                              allow_patterns=[f"{REMOTE_CHECKPOINT}/*", "log_history.jsonl", "events.out.tfevents.*"])
        step = max(os.listdir(os.path.join(staging, REMOTE_CHECKPOINT)), key=int)
        target = storage.join(checkpoint.directory_of(output_dir), step)
        storage.put(os.path.join(staging, REMOTE_CHECKPOINT, step), target, move=True)
        for name in os.listdir(staging):  # the logs, unless this output_dir has its own
            path = os.path.join(staging, name)
            if os.path.isfile(path) and not storage.exists(storage.join(output_dir, name)):
                storage.put(path, storage.join(output_dir, name), move=True)
    logger.warning("Downloaded the training state of step %s from %s/%s into %s", step, api.endpoint, repo_id,
                   target)


# -------------------------------------------------------------------------------------------------- finish
def finish(repo: Optional[HubRepo], task: str, flags: dict, changed: dict, script: Optional[str] = None):
    """The end of every script (after write_results): writes output_dir/README.md, pushes everything, waits for
    all uploads. Does nothing without a repo (no --push_to_hub, or not process 0). Raises RuntimeError when the
    final push failed after its retries, so the run exits non-zero; the files stay in output_dir.

    task: the Hub pipeline tag, e.g. "fill-mask", "text-generation", "text2text-generation"; flags: every flag
    but secrets, changed: those not at their defaults (settings.RunSettings).
    """
    if repo is None:
        return
    model_card.write(repo.output_dir, repo.repo_id, task, flags, changed, script=script)
    repo.push_final()
    if not repo.close():
        raise RuntimeError(f"The final push to {repo.url} failed (see the errors above). Everything is in "
                           f"{repo.output_dir}; upload it with `hf upload {repo.repo_id} {repo.output_dir} "
                           f"--exclude '{checkpoint.CHECKPOINTS}/*'`.")
    if repo.failed:
        logger.warning("Hub: %d earlier push(es) failed, the final one arrived: %s", len(repo.failed), repo.url)
    logger.info("Pushed the model, logs, results and model card to %s", repo.url)
