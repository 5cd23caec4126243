"""Errors meant for the person who wrote the experiment or owns the folder, not for a traceback.

Every command runs inside `guarded`, which prints a UserError and exits with status 2; anything
else is a bug. Imports the standard library only, so the schema can use it without torch.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from types import ModuleType
from typing import Callable


class UserError(Exception):
    """A problem the user can fix: the message names the file or key, what is wrong and the fix."""


class ConfigError(UserError):
    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        noun = "problem" if len(problems) == 1 else "problems"
        body = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} {noun}:\n{body}")


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


class NonFiniteWeights(CheckpointError):
    pass


class NonFiniteLoss(UserError):
    pass


class WriteError(UserError):
    pass


class PeerLost(UserError):
    """Another process of a distributed run died or stopped answering."""


def optional_import(module: str, extra: str) -> ModuleType:
    """A module of one of imgcls's optional extras, or a UserError naming the install that brings it.

    Called inside the functions that need it: the extras' libraries stay off every other command's
    start-up, and their absence fails only the command that needs them."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(
            f"{module} is not installed ({e}); it comes with imgcls's {extra!r} extra: pip install -e '.[{extra}]'"
        ) from None


class Terminated(Exception):
    """SIGTERM, raised in the main thread so `finally` blocks run as for Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def guarded(fn: Callable[[], int], on_interrupt: str = "") -> int:
    """Run a command: user errors print one clear message (no traceback) and exit 2.

    Ctrl-C exits 130 and SIGTERM 143 (the shell's 128 + signal), after saying what was kept. Output
    works in a pipe and on any terminal: a reader that stops early (`| head -1`) ends the command
    quietly with 141 (128 + SIGPIPE, as the shell reports a command the pipe ended), and a character
    the terminal's encoding lacks is printed as its backslash escape instead of failing.
    """
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a TextIOWrapper; stand-ins (a test's StringIO) have no encoding to fail
            stream.reconfigure(errors="backslashreplace")
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        status = fn()
        sys.stdout.flush()  # here, not at exit: a reader gone away must surface inside this guard
        return status
    except BrokenPipeError:
        _discard_stdout()
        return 141
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted{'; ' + on_interrupt if on_interrupt else ''}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"terminated{'; ' + on_interrupt if on_interrupt else ''}", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush at exit does not fail again on the
    closed pipe (the recipe of Python's signal documentation)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a file descriptor: nothing is flushed to a pipe at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
