"""A run owns its output_dir: a second run into it is refused in one line before any work, the first's results stay
whole; a lock whose owner is gone is taken over (at once on its host, with --take_over_output_dir from another);
the suite's refusals are one line without a traceback; a run stopped at any phase starts again with the same
command."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flaxtrain import output_lock
from tests import tiny
from tests.gcs_server import gcs_bucket  # noqa: F401, F811  (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--output_dir=run", "--train_file=train.txt", "--validation_file=valid.txt", "--config_name=model",
         "--tokenizer_name=model", "--max_seq_length=32", "--per_device_train_batch_size=4", "--learning_rate=3e-3",
         "--logging_steps=10", "--eval_steps=40", "--save_steps=40"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A working directory with the data and model the commands name by relative paths."""
    work = tmp_path_factory.mktemp("lock")
    tiny.write_corpus(work / "train.txt", seed=0)
    tiny.write_corpus(work / "valid.txt", lines=20, seed=1)
    tiny.make_roberta(work / "model", str(work / "train.txt"))
    return work


def start(work, *flags, env=None):
    """`python run_mlm_flax.py FLAGS` from `work`, in the background (2 simulated devices)."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "run_mlm_flax.py"), *flags], cwd=work,
                            env=tiny.script_env(2, env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def refusal(done) -> str:
    """The one line a refused run prints: its stderr has no traceback and ends with it."""
    stderr = done.stderr if isinstance(done, subprocess.CompletedProcess) else done[1]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), stderr[-3000:]
    return last


def owner_pid(directory):
    try:
        return json.loads((directory / output_lock.LOCK_FILE).read_text())["pid"]
    except (FileNotFoundError, ValueError):  # between the old owner's lock and the new one's
        return None


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(directory, **owner):
    os.makedirs(directory, exist_ok=True)
    record = dict(host="other-host", pid=1, started="2026-01-01T00:00:00", heartbeat=time.time(),
                  command="python run_mlm_flax.py ...", id="theirs")
    with open(os.path.join(directory, output_lock.LOCK_FILE), "w") as f:
        json.dump({**record, **owner}, f)


# ------------------------------------------------------------------------------------------ the lock itself
def test_a_second_lock_is_refused_naming_the_owner_and_released_at_the_end(tmp_path):
    first = output_lock.OutputLock(str(tmp_path / "run"))
    with pytest.raises(ValueError, match=rf"--output_dir=.*run is in use by a run started .* on host .* \(pid "
                                         rf"{os.getpid()}, last heartbeat \d+ s ago.*--take_over_output_dir"):
        output_lock.OutputLock(str(tmp_path / "run"))
    first.release()
    assert not (tmp_path / "run").exists(), "an output_dir the lock created and nothing filled goes with it"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    output_lock.OutputLock(str(tmp_path / "run")).release()
    assert os.listdir(tmp_path / "run") == ["results.json"]


def test_a_lock_whose_process_ended_on_this_host_is_taken_over(tmp_path, caplog):
    import socket

    write_lock(tmp_path, host=socket.gethostname(), pid=dead_pid())
    lock = output_lock.OutputLock(str(tmp_path))
    assert "its process has ended" in caplog.text
    assert json.loads((tmp_path / output_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_record_cut_short_by_a_kill_is_nobodys(tmp_path):
    (tmp_path / output_lock.LOCK_FILE).write_text('{"host": "vm", "pi')
    output_lock.OutputLock(str(tmp_path)).release()
    assert not (tmp_path / output_lock.LOCK_FILE).exists()


def test_a_lock_from_another_host_needs_the_flag_and_a_stale_one_says_so(tmp_path):
    write_lock(tmp_path)  # alive, as far as anyone here can tell
    with pytest.raises(ValueError, match="if that run is gone .* --take_over_output_dir"):
        output_lock.OutputLock(str(tmp_path))
    write_lock(tmp_path, heartbeat=time.time() - output_lock.STALE_S - 60)
    with pytest.raises(ValueError, match="looks gone .* --take_over_output_dir"):
        output_lock.OutputLock(str(tmp_path))
    output_lock.OutputLock(str(tmp_path), take_over=True).release()
    assert not (tmp_path / output_lock.LOCK_FILE).exists()


def test_the_heartbeat_is_refreshed(tmp_path, monkeypatch):
    monkeypatch.setattr(output_lock, "HEARTBEAT_S", 0.2)
    lock = output_lock.OutputLock(str(tmp_path))
    first = json.loads((tmp_path / output_lock.LOCK_FILE).read_text())["heartbeat"]
    time.sleep(1.0)
    assert json.loads((tmp_path / output_lock.LOCK_FILE).read_text())["heartbeat"] > first
    lock.release()


def test_a_signal_a_library_swallowed_still_stops_the_run_at_its_next_phase(monkeypatch):
    from flaxtrain import exits
    monkeypatch.setattr(exits, "_interrupted_by", [])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    try:
        exits.interrupts_raise()
        exits.stop_if_interrupted()  # no signal yet: nothing happens
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except BaseException:  # noqa: BLE001  (as a finalizer or a library's broad except does)
            pass
        with pytest.raises(KeyboardInterrupt):
            exits.stop_if_interrupted()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


# ------------------------------------------------------------------------------------ as a user meets it
def test_two_runs_into_one_output_dir_the_second_refused_before_any_work(work):
    first = start(work, *FLAGS, "--max_steps=120")
    wait_for(work / "run" / "log_history.jsonl", first)  # the first is training
    first.send_signal(signal.SIGSTOP)  # (a tiny run would finish before the others start)
    try:
        for flags in (FLAGS, [*FLAGS, "--learning_rate=1e-3"]):  # the same command; another one
            began = time.monotonic()
            second = start(work, *flags, "--max_steps=120").communicate(timeout=120)
            assert "is in use by a run started" in refusal(second) and "--take_over_output_dir" in second[1]
            assert time.monotonic() - began < 60, "refused before any work"
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    results = tiny.read_json(work / "run" / "all_results.json")
    assert results["train_steps"] == 120 and "eval_loss" in results
    records = tiny.read_json(work / "run" / "training_args.json")
    assert [r["flags"]["learning_rate"] for r in records] == [3e-3], "one run, the first, wrote there"
    assert not (work / "run" / output_lock.LOCK_FILE).exists()


def test_a_run_into_a_locked_bucket_folder_is_refused_in_one_line(work, gcs_bucket):  # noqa: F811
    held = output_lock.OutputLock(f"{gcs_bucket}/run")
    try:
        with pytest.raises(ValueError, match="is in use"):
            output_lock.OutputLock(f"{gcs_bucket}/run")
        done = start(work, *FLAGS, f"--output_dir={gcs_bucket}/run", "--max_steps=10").communicate(timeout=120)
        assert f"--output_dir={gcs_bucket}/run is in use by a run started" in refusal(done)
    finally:
        held.release()
    output_lock.OutputLock(f"{gcs_bucket}/run").release()


def test_killed_before_its_first_checkpoint_the_same_command_starts_again(work, tmp_path):
    """kill -9 during training (the lock stays, its process gone), then the same command; Ctrl-C while it loads
    says "interrupted", and the same command again runs to the end."""
    run = [*FLAGS, "--output_dir=killed", "--max_steps=200", "--save_steps=200"]
    first = start(work, *run)
    wait_for(work / "killed" / "log_history.jsonl", first)
    first.kill()
    first.communicate()
    assert (work / "killed" / output_lock.LOCK_FILE).exists()
    saved = os.listdir(work / "killed" / "checkpoints") if (work / "killed" / "checkpoints").exists() else []
    assert not any(name.isdigit() for name in saved), "killed before its first save"

    second = start(work, *run)
    deadline = time.monotonic() + 120
    while owner_pid(work / "killed") != second.pid:
        assert second.poll() is None and time.monotonic() < deadline, second.communicate()[1][-3000:]
        time.sleep(0.1)  # until it owns the folder: it is past its start and loading
    second.send_signal(signal.SIGINT)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 130 and "Interrupted by SIGINT" in err and "Traceback" not in err, err[-3000:]

    done = tiny.run_script("run_mlm_flax.py", run, devices=2, cwd=work)
    assert "stopped before its first checkpoint: starting it again" in done.stderr
    assert tiny.read_json(work / "killed" / "all_results.json")["train_steps"] == 200


@pytest.mark.parametrize("flags, names", [
    (["--train_file=missing.txt"], "--train_file=missing.txt: no such file"),
    (["--mlm_probability=2"], "--mlm_probability must be between 0 and 1"),
    (["--tokenizer_name=broken"], "--tokenizer_name=broken: cannot read its tokenizer files"),
    (["--max_seq_length=4096"], "--max_seq_length=4096 is more than the model's"),
])
def test_bad_input_is_one_line_without_a_traceback(work, flags, names):
    broken = work / "broken"
    if not broken.exists():
        import shutil

        shutil.copytree(work / "model", broken)
        (broken / "tokenizer.json").write_text('{"version": "1.0", "truncation": nul')  # cut short
    done = tiny.run_script("run_mlm_flax.py", [*FLAGS, "--output_dir=bad", "--max_steps=2", *flags], devices=1,
                           cwd=work, returncode=1)
    assert names in refusal(done)
    assert not (work / "bad").exists()


def test_debug_shows_the_traceback(work):
    done = tiny.run_script("run_mlm_flax.py", [*FLAGS, "--output_dir=bad", "--train_file=missing.txt"], devices=1,
                           cwd=work, returncode=1, env={"FLAXTRAIN_DEBUG": "1"})
    assert "Traceback" in done.stderr and "FileNotFoundError: --train_file=missing.txt" in done.stderr
