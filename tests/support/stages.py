"""Test helpers shared across parts: stages."""
import contextlib
import io


def stage(main, *argv) -> tuple[int, str]:
    """(exit status, stderr) of a stage's main()."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(list(argv))
    return status, err.getvalue()


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "weights_only" not in err
    return lines[0]
