"""What the command lines (``diffseg_jax.main``, ``diffseg_jax.table1``, ``diffseg_jax.report``) share: a user's
mistake is one message.

A config that cannot work, a bad data file, a checkpoint of another model or a missing file is explained by its
message (each names the key or file and the fix), so it is printed without a traceback; a bug keeps its traceback,
and ``DIFFSEG_JAX_TRACEBACK=1`` shows it for everything.
"""

from __future__ import annotations

import ast
import os
from typing import Any, Callable

from absl import app


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types whose message alone explains the mistake."""
    from diffseg_jax import checkpoints, configlib, locks  # noqa: PLC0415 — imported only when something failed
    from diffseg_jax.data import files  # noqa: PLC0415 — likewise

    return (
        configlib.ConfigError,
        checkpoints.TrainingDivergedError,
        locks.WorkdirError,
        files.DatasetFileError,
        checkpoints.CheckpointMismatchError,
        checkpoints.CheckpointWriteError,
        FileNotFoundError,
    )


def _traceback_wanted() -> bool:
    return bool(os.environ.get("DIFFSEG_JAX_TRACEBACK"))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser; a --config override of an unknown key or of the wrong type is reported as one message
    (ml_collections raises it deep in flag parsing, as an error wrapped in two others)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if _traceback_wanted():
            raise
        message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        while len(message) > 1 and message[0] == message[-1] == "'":  # a KeyError's repr, wrapped again
            try:
                message = ast.literal_eval(message)
            except (SyntaxError, ValueError):
                break
        raise SystemExit(f"Error in the --config flags: {message}".replace("\n", ". ")) from None


def reporting_user_errors(call: Callable[[], Any], also: tuple[type[Exception], ...] = ()) -> Any:
    """``call()``, with a :func:`user_errors` (or ``also``) exception turned into its message and exit status 1."""
    try:
        return call()
    except Exception as e:
        if _traceback_wanted() or not isinstance(e, user_errors() + also):
            raise
        raise SystemExit(f"Error: {e}\n(DIFFSEG_JAX_TRACEBACK=1 shows the traceback.)") from None


def run(main: Callable[[list[str]], None]) -> None:
    """``app.run(main)`` with :func:`parse_flags`, and the :func:`user_errors` as one message (exit status 1)."""
    app.run(lambda argv: reporting_user_errors(lambda: main(argv)), flags_parser=parse_flags)
