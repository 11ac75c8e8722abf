"""dvc.yaml is honest about code: each stage lists every project module its script loads.

A stage's code is the import closure of its script: the modules a fresh interpreter
holds after ``import pipelines.<stage>`` (which catches dynamic imports), together
with the static closure :func:`demar.identity.project_modules` finds (which catches
imports inside functions, run only when the stage runs). A module missing from the
stage's ``deps`` would let an edit there leave ``dvc status`` clean over stale
outputs, so it fails here, named; a listed module the stage never loads would rerun
the stage for nothing, so it fails too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from demar.identity import PROJECT_PACKAGES, project_modules

REPO = Path(__file__).resolve().parents[1]
SCRIPT = re.compile(r"-m\s+(pipelines\.\w+)")

# One interpreter imports the heavy third-party libraries once, then forks a child per
# script: each child starts with no project module loaded, as a fresh interpreter would.
_LOADED = f"""
import importlib, json, os, sys
for lib in ("numpy", "torch", "torchvision", "pydantic", "yaml", "tqdm", "PIL", "mlflow", "matplotlib"):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
assert not [m for m in sys.modules if m.split(".")[0] in {PROJECT_PACKAGES!r}]
result = {{}}
for module in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            out = sorted(m for m in sys.modules if m.split(".")[0] in {PROJECT_PACKAGES!r})
        except BaseException as err:
            out = {{"error": f"{{type(err).__name__}}: {{err}}"}}
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        result[module] = json.loads(pipe.read())
    os.waitpid(pid, 0)
print(json.dumps(result))
"""


def module_path(name: str) -> str:
    """The repository-relative file of project module ``name``."""
    base = Path(*name.split("."))
    return (base / "__init__.py").as_posix() if (REPO / base).is_dir() else base.with_suffix(".py").as_posix()


_loaded: dict[str, frozenset[str]] = {}


def load_scripts(modules: list[str]) -> None:
    """Record the project modules loaded by importing each of ``modules`` afresh (see ``_LOADED``)."""
    todo = sorted(set(modules) - _loaded.keys())
    if not todo:
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _LOADED, *todo], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"importing {todo} failed:\n{proc.stderr[-2000:]}"
    for module, loaded in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert isinstance(loaded, list), f"importing {module} failed: {loaded['error']}"
        _loaded[module] = frozenset(loaded)


def loaded_at_import(module: str) -> frozenset[str]:
    """Project modules a fresh interpreter holds after importing ``module``."""
    load_scripts([module])
    return _loaded[module]


def stage_code(module: str) -> set[str]:
    """Repository-relative files of every project module the stage script ``module`` loads."""
    return {module_path(m) for m in loaded_at_import(module) | set(project_modules(module))}


def stages(dvc_yaml: Path) -> dict[str, tuple[list[str], list[str]]]:
    """``{stage: (scripts, code deps)}`` of ``dvc_yaml``; code deps are those under the project packages."""
    out = {}
    for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        body = stage.get("do", stage)
        scripts = SCRIPT.findall(body["cmd"])
        deps = [d for d in body.get("deps", []) if str(d).split("/")[0] in PROJECT_PACKAGES]
        out[name] = (sorted(set(scripts)), deps)
    return out


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def _is_code(dep: str) -> bool:
    """A Python file, or a folder holding one (``reports/paper`` holds data, not code)."""
    path = REPO / dep
    return dep.endswith(".py") or (path.is_dir() and any(path.rglob("*.py")))


def dependency_errors(dvc_yaml: Path) -> list[str]:
    """One line per stage whose code deps miss a module it loads or list code it never loads."""
    table = stages(dvc_yaml)
    load_scripts([s for ss, _ in table.values() for s in ss])
    errors = []
    for name, (mods, deps) in table.items():
        if not mods:
            errors.append(f"{name}: its cmd runs no `-m pipelines.<script>`; cannot check its deps")
            continue
        code = set().union(*(stage_code(m) for m in mods))
        missing = sorted(p for p in code if not _covered(p, deps))
        unused = sorted(d for d in deps if _is_code(d) and not any(_covered(p, [d]) for p in code))
        if missing:
            errors.append(f"{name}: deps omit {', '.join(missing)}")
        if unused:
            errors.append(f"{name}: deps list {', '.join(unused)}, which the stage never loads")
    return errors


def test_every_stage_lists_exactly_the_code_it_loads():
    errors = dependency_errors(REPO / "dvc.yaml")
    assert not errors, "dvc.yaml deps are not the stages' code:\n" + "\n".join(errors)


def test_a_deliberately_omitted_dependency_fails(tmp_path):
    data = yaml.safe_load((REPO / "dvc.yaml").read_text())
    train = data["stages"]["train"]["do"]
    assert "demar/model.py" in train["deps"]
    train["deps"].remove("demar/model.py")
    data["stages"]["prepare_data"]["deps"].append("reports/figures.py")
    copy = tmp_path / "dvc.yaml"
    copy.write_text(yaml.safe_dump(data, sort_keys=False))
    errors = dependency_errors(copy)
    assert any(e.startswith("train: deps omit") and "demar/model.py" in e for e in errors), errors
    assert any(e.startswith("prepare_data: deps list") and "reports/figures.py" in e for e in errors), errors
    assert len(errors) == 2, errors


@pytest.mark.parametrize("path", ["demar/data", "demar/data/"])
def test_a_directory_dep_covers_its_modules(path):
    assert _covered("demar/data/embedded.py", [path])
    assert not _covered("demar/datasets.py", [path])


if __name__ == "__main__":  # print each stage's exact code deps, to paste into dvc.yaml
    table = stages(REPO / "dvc.yaml")
    load_scripts([s for ss, _ in table.values() for s in ss])
    for name, (mods, _) in table.items():
        print(f"{name}:")
        for path in sorted(set().union(*(stage_code(m) for m in mods))):
            print(f"  - {path}")
