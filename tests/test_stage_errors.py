"""Stage scripts report the user's errors as one line and status 2, other errors as tracebacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from demar.config import ConfigError
from demar.io import UnsafeFileError
from pipelines import run_stage

pytestmark = pytest.mark.reliability


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("invalid configuration in params.yaml:\n  train.epochs: bad"),
        UnsafeFileError(Path("models/demar/checkpoints/last.pt"), "refused os.system"),
        PermissionError("output folder is not writable: models/demar"),
    ],
)
def test_user_errors_are_one_line_and_status_2(error, capsys):
    def main() -> int:
        raise error

    with pytest.raises(SystemExit) as exit_:
        run_stage(main, "train")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train: error: ")
    assert "Traceback" not in err


def test_a_bug_keeps_its_traceback():
    def main() -> int:
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_stage(main, "train")
