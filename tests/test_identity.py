"""Run identity: the code digest follows behaviour, not comments or docstrings."""

from __future__ import annotations

import pytest

from demar import identity


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A throw-away project package ``demar`` under ``tmp_path`` that the digest reads."""
    pkg = tmp_path / "demar"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""pkg."""\n')
    (pkg / "a.py").write_text('"""Module a."""\nfrom demar import b\n\n\ndef f(x):\n    """Doc."""\n    return b.g(x) + 1\n')
    (pkg / "b.py").write_text("def g(x):\n    from .c import h  # lazy import\n    return h(x)\n")
    (pkg / "c.py").write_text("def h(x):\n    return 2 * x\n")
    (pkg / "unrelated.py").write_text("X = 1\n")
    monkeypatch.setattr(identity, "ROOT", tmp_path)
    identity._parse.cache_clear()
    yield pkg
    identity._parse.cache_clear()


def test_closure_follows_imports_including_lazy_and_relative_ones(project):
    assert identity.project_modules("demar.a") == ["demar", "demar.a", "demar.b", "demar.c"]


def test_comments_docstrings_and_layout_keep_the_digest(project):
    before = identity.code_digest("demar.a")
    (project / "a.py").write_text(
        '"""Module a, reworded."""\n# a comment\nfrom demar import b\n\ndef f(x):\n    """Other doc."""\n\n    return b.g(x)  +  1\n'
    )
    (project / "unrelated.py").write_text("X = 2\n")
    identity._parse.cache_clear()
    assert identity.code_digest("demar.a") == before


def test_a_behaviour_change_in_an_imported_module_changes_the_digest(project):
    before = identity.code_digest("demar.a")
    (project / "c.py").write_text("def h(x):\n    return 3 * x\n")
    identity._parse.cache_clear()
    assert identity.code_digest("demar.a") != before


def test_unknown_entry_is_an_error_naming_it(project):
    with pytest.raises(ValueError, match="demar.nope"):
        identity.project_modules("demar.nope")


def test_the_real_training_closure_holds_the_model_code():
    modules = identity.project_modules("demar.model")
    assert {"demar.backbone", "demar.diffusion", "demar.denoising_head"} <= set(modules)
    assert len(identity.code_digest("demar.model")) == 64
