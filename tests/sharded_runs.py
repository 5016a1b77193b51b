"""`python tests/sharded_runs.py SPEC.json` runs a training script's main() several times in one process (one import,
one set of simulated devices) and records how the train state each run trained was laid out on the devices.

SPEC.json: {"script": "run_mlm_flax.py", "runs": [[flag, ...], ...], "record": "layouts.json"}. For each run,
`record` gets the state's leaves as they were handed to the training loop: {"path": [shape, sharding spec,
fully replicated]}, so tests assert on the arrays' real shardings, not on the flags.
"""

import json
import os
import runpy
import sys

import jax

from flaxtrain import loop


def layout_of(state) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): [list(x.shape), str(x.sharding.spec), x.sharding.is_fully_replicated]
            for path, x in leaves if isinstance(x, jax.Array)}


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = runpy.run_path(os.path.join(root, spec["script"]))  # its main(), not run as __main__
    layouts, train = [], loop.train

    def recording_train(state, *args, **kwargs):
        layouts.append(layout_of(state))
        return train(state, *args, **kwargs)

    loop.train = recording_train
    for flags in spec["runs"]:
        script["main"](flags)
    with open(spec["record"], "w") as f:
        json.dump(layouts, f)


if __name__ == "__main__":
    main()
