"""Files under output_dir, on a local disk or in a bucket (`gs://...`, or any other fsspec URL such as `s3://...`).

Local paths go through `os`, URLs through fsspec (gcsfs for gs://). A file is written whole or not at all: locally
under a temporary name that is then renamed, in a bucket as one upload, which the store publishes only when it is
complete. Orbax checkpoints do not come through here: orbax and tensorstore read and write URLs themselves.
"""

import os
import shutil
import tempfile

LOCAL_SCHEMES = ("file://",)


def _never_cache_listings():
    """Bucket listings are read fresh every time, in every fsspec file system (orbax's path layer, etils, makes
    its own): other hosts, and orbax's background threads, write to the bucket while this process reads it."""
    import fsspec.config

    for protocol in ("gs", "gcs", "s3"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_never_cache_listings()


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith(LOCAL_SCHEMES)


def absolute(path: str) -> str:
    """A local path made absolute (`~` expanded), so that it means the same after a change of directory and orbax
    takes it; a URL as it is, without a trailing slash."""
    if is_remote(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path.removeprefix("file://")))


def join(base: str, *parts: str) -> str:
    return "/".join((base.rstrip("/"), *parts)) if is_remote(base) else os.path.join(base, *parts)


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(os.path.normpath(path))


def parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(os.path.normpath(path))


def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)[0]


def exists(path: str) -> bool:
    return _fs(path).exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _fs(path).isdir(path) if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return _fs(path).isfile(path) if is_remote(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
    """Names in the folder `path` (empty when it does not exist)."""
    if not is_remote(path):
        return os.listdir(path) if os.path.isdir(path) else []
    fs = _fs(path)
    if not fs.isdir(path):
        return []
    return sorted({entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)})


def makedirs(path: str):
    """Creates a local folder; a bucket has no folders to create."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        return _fs(path).cat_file(path)
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def write_bytes(path: str, data: bytes):
    """Writes `path` whole: no reader ever sees half of it."""
    if is_remote(path):
        _fs(path).pipe_file(path, data)
        return
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    descriptor, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def create_exclusive(path: str, data: bytes) -> bool:
    """Writes `path` only if it does not exist (in a bucket: a generation precondition, so two writers never both
    succeed); returns whether it did."""
    if not is_remote(path):
        try:
            with open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        return True
    try:
        _fs(path).pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def write_text(path: str, text: str):
    write_bytes(path, text.encode())


def remove(path: str):
    """Removes a file or a folder with everything in it; nothing when it does not exist."""
    if is_remote(path):
        fs = _fs(path)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def move(source: str, target: str):
    """Renames a file or folder (in a bucket: copies, then removes the original)."""
    if is_remote(source):
        _fs(source).mv(source, target, recursive=True)
    else:
        os.replace(source, target)


def put(local: str, target: str, move: bool = False):
    """Copies (or moves) the local file `local` to `target`, or the local folder `local` to the folder `target`, with
    everything in it. A local move is a rename where it can be (no second copy of a large checkpoint on disk)."""
    if not is_remote(target):
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        if move:
            shutil.move(local, target)
        elif os.path.isdir(local):
            shutil.copytree(local, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(local, target)
        return
    fs = _fs(target)
    files = [local] if os.path.isfile(local) else [os.path.join(root, name) for root, _, names in os.walk(local)
                                                      for name in names]
    for path in files:
        relative = os.path.relpath(path, local).split(os.sep) if path != local else []
        fs.put_file(path, join(target, *relative))
    if move:
        remove(local)


def size(path: str) -> int:
    return _fs(path).size(path) if is_remote(path) else os.path.getsize(path)


def open_read(path: str):
    """A binary, seekable file object of `path` (for streaming large files instead of reading them whole)."""
    if is_remote(path):
        return _fs(path).open(path, "rb")
    return open(path, "rb")


def files_under(path: str) -> list[str]:
    """The paths, relative to the folder `path` and joined with "/", of every file below it."""
    if is_remote(path):
        base = path.split("://", 1)[1].rstrip("/") + "/"
        return sorted(name.split("://", 1)[-1].removeprefix(base) for name in _fs(path).find(path))
    return sorted(os.path.relpath(os.path.join(root, name), path).replace(os.sep, "/")
                  for root, _, names in os.walk(path) for name in names)


def download(source: str, local_dir: str) -> str:
    """Copies the files at the top of the folder `source` into `local_dir`; returns `local_dir`."""
    os.makedirs(local_dir, exist_ok=True)
    for name in listdir(source):
        if isfile(join(source, name)):
            with open(os.path.join(local_dir, name), "wb") as f:
                f.write(read_bytes(join(source, name)))
    return local_dir
