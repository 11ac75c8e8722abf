"""Run identity: which code produced a result.

A resumable output (checkpoints, sample folders, time-vs-FID points, latent shards,
study trials) records, beside its config, :func:`code_digest` of the modules that
compute it. Resuming requires both to match, so an edit that changes behaviour in
any of those modules starts the work afresh instead of reusing stale pieces.

The digest hashes each module's syntax tree with docstrings removed, so comments,
docstrings and formatting can change without invalidating finished work. The
modules are found statically: the project modules (``demar``, ``pipelines``,
``reports``) that the entry modules import, directly or not, including imports
inside functions.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import importlib.util
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

__all__ = ["PROJECT_PACKAGES", "code_digest", "project_modules"]

PROJECT_PACKAGES = ("demar", "pipelines", "reports")
ROOT = Path(__file__).resolve().parent.parent


def _module_file(name: str) -> Path | None:
    """The source file of project module ``name``, or None if it is not one."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_names(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """Every module name an ``import`` or ``from ... import`` in ``tree`` may refer to."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    # importing a.b.c runs a/__init__ and a/b/__init__ too
    return {".".join(n.split(".")[:i]) for n in found for i in range(1, n.count(".") + 2)}


@lru_cache(maxsize=None)
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def project_modules(*entries: str) -> list[str]:
    """The project modules ``entries`` import, directly or not (``entries`` included), sorted."""
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        todo.extend(_imported_names(_parse(path), name, path.name == "__init__.py"))
    missing = [e for e in entries if e not in seen]
    if missing:
        raise ValueError(f"not project modules: {', '.join(missing)} (packages: {', '.join(PROJECT_PACKAGES)})")
    return sorted(seen)


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return tree


def code_digest(*entries: str, modules: Iterable[str] | None = None) -> str:
    """sha256 of the code of ``entries`` and every project module they import.

    Each module contributes its name and its syntax tree without docstrings, so the
    digest changes with behaviour, not with comments, docstrings or layout.

    Args:
        entries: dotted module names, e.g. ``"demar.train"``.
        modules: an explicit module list instead of the import closure of ``entries``.
    """
    names = sorted(modules) if modules is not None else project_modules(*entries)
    h = hashlib.sha256()
    for name in names:
        path = _module_file(name)
        if path is None:
            raise ValueError(f"not a project module: {name}")
        tree = _strip_docstrings(copy.deepcopy(_parse(path)))  # each file read and parsed once per process
        h.update(name.encode() + b"\0" + ast.dump(tree, annotate_fields=False).encode() + b"\0")
    return h.hexdigest()
