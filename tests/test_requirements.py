"""Every third-party module the scripts and flaxtrain/ import comes with requirements.txt: a user's environment
has only that (the test environment has more, e.g. torch, which brought jinja2 while requirements.txt lacked it)."""

import ast
import importlib.metadata as metadata
import pathlib
import re
import sys

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Imported only where a user needs them, with a one-line error naming what to install where they are missing.
OPTIONAL = {"torch"}  # hf_io: a pytorch_model.bin checkpoint


def imported_modules() -> set[str]:
    """Top-level names of every module imported anywhere in run_*.py and flaxtrain/ (lazily too)."""
    names = set()
    for path in [*ROOT.glob("run_*.py"), *(ROOT / "flaxtrain").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"flaxtrain", "__future__"} - OPTIONAL


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_by_requirements() -> set[str]:
    """The distributions requirements.txt names, and everything they require (markers evaluated, extras not)."""
    wanted = [Requirement(line.split("#")[0].strip()) for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.split("#")[0].strip()]
    seen, todo = set(), [r.name for r in wanted]
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for spec in map(Requirement, requires):
            if spec.marker is None or spec.marker.evaluate({"extra": ""}):
                todo.append(spec.name)
    return seen


def test_every_imported_module_is_installed_by_requirements_txt():
    provided = installed_by_requirements()
    distributions = metadata.packages_distributions()
    missing = {module: distributions.get(module) for module in imported_modules()
               if not any(canonical(d) in provided for d in distributions.get(module, [module]))}
    assert not missing, f"imported but not installed by requirements.txt: {missing}"
