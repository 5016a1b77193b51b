"""Put on PYTHONPATH by tests/tiny.run_script: the scripts' subprocesses start as on a TPU VM, where torch is not
installed (the test environment has it for the parity tests, which run in pytest's own process). transformers
imports torch whenever it is installed: about 2.5 CPU seconds of each of the suite's few hundred script starts."""

import importlib.machinery
import sys


class WithoutTorch:
    """sys.meta_path's PathFinder, except that it finds no torch: `import torch` fails and find_spec says None."""

    def __getattr__(self, name):
        return getattr(importlib.machinery.PathFinder, name)

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [WithoutTorch() if finder is importlib.machinery.PathFinder else finder
                    for finder in sys.meta_path]
