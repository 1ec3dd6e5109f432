"""Bad input of every kind: one line on stderr naming the flag, file or value, exit code 2, no traceback,
nothing half-written. The CLI runs in-process (``ncbench.cli.main``), as a user's shell would call it."""
from __future__ import annotations

import pytest

from ncbench.cli import main

MINI = ("--dataset", "synthetic-mini", "--epochs", "1")


def invoke(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``ncbench argv`` in this process; return (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(capsys, *argv: str, code: int = 2) -> str:
    got, _, err = invoke(capsys, *argv)
    assert got == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


USAGE_ERRORS = [
    (("run", "--noise", "abc"), "--noise"),
    (("run", "--seed", "1.5"), "--seed"),
    (("run", "--epochs", "two"), "--epochs"),
    (("run", "--bogus"), "--bogus"),
    (("sweep",), "--methods"),
    (("noise", "import"), "path"),
    (("frob",), "frob"),
    (("list", "--plugin"), "--plugin"),
    (("leaderboard", "--format"), "--format"),
]


@pytest.mark.parametrize("argv,word", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line(capsys, tmp_path, argv, word):
    line = one_error_line(capsys, *argv)
    assert word in line and "--help" in line


@pytest.mark.parametrize("argv", [(), ("noise",)], ids=["ncbench", "ncbench noise"])
def test_bare_command_prints_help(capsys, argv):
    code, out, err = invoke(capsys, *argv)
    assert code == 0 and "Usage" in out and "Traceback" not in err
