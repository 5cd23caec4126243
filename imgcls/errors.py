"""Errors meant for the person who wrote the experiment or owns the folder, not for a traceback.

Every command catches UserError, prints it and exits with status 2; anything else is a bug.
"""

from __future__ import annotations


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
