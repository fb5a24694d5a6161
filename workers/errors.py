"""One exception type for every user mistake, so the CLI can print one line and exit 2."""


class MergeInputError(Exception):
    """A problem with the user's input; the message names the problem and the fix in one line."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        message = problem if fix is None else f"{problem} — {fix}"
        super().__init__(message)
        self.problem = problem
        self.fix = fix
