"""JAX's persistent compilation cache, on by default: a rerun or a resumed run reads its compiled steps from disk
instead of compiling them again (seconds for a small model on a CPU, minutes for a large one on a TPU).

JAX keys each entry by the program, the devices and the compiler options, so one folder serves every run and
model. Keep it private: JAX runs what it finds there.
"""

import logging
import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from flaxtrain import storage

logger = logging.getLogger(__name__)


def default_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "flaxtrain", "jax")


def use(path: str | None) -> str | None:
    """Caches compiled programs in `path` (a folder, or a gs:// URL); None: JAX_COMPILATION_CACHE_DIR if set, else
    default_dir(); "none": no cache. Call it before the first compilation. Returns the folder, or None."""
    if path and path.lower() == "none":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = storage.absolute(path or jax.config.jax_compilation_cache_dir or default_dir())
    jax.config.update("jax_enable_compilation_cache", True)
    if path != jax.config.jax_compilation_cache_dir:
        compilation_cache.set_cache_dir(path)
        compilation_cache.reset_cache()  # JAX opens its folder once per process; main() may run again in one
    logger.info("Compiled steps are cached in %s (--compilation_cache_dir)", path)
    return path
