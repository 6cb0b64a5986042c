"""User-facing errors. Anything the user can fix by changing their input is a UserError: the CLI
prints it without a traceback and exits 2. Everything else is a bug or an infrastructure failure
and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a spec, an argument, or data that cannot be used. Exit code 2."""


class SpecError(UserError):
    """A pipeline file with one or more problems, all reported together."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun}\n" + "\n".join(f"  - {p}" for p in problems))
