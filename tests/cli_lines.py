"""The CLI's error contract, shared by the CLI tests: a failing command prints one line on stderr and exits 2."""

from hf_safe_exit.cli import main


def one_error_line(capsys, argv) -> str:
    """Run ``hf-safe-exit argv`` in process; assert exit status 2 and a single stderr line (no traceback); return it."""
    capsys.readouterr()  # drop what fixtures printed
    status = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
