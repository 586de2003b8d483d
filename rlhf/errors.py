"""Errors that are the user's to fix: the `rlhf` command prints them in one line and exits with code 2."""


class UserError(Exception):
    """Bad input, config or environment, explained well enough to fix without a traceback."""

    exit_code = 2


class DataError(UserError):
    """A data file that cannot be used. The message reads `file:line: field: problem`."""

    def __init__(self, path, line, field: str, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {field}: {problem}")


class ConfigError(UserError):
    """A config file or command-line override that does not fit the stage's dataclass."""


class ModelError(UserError):
    """A model spec that cannot be resolved to weights on this machine."""


class MissingInputError(UserError):
    """A stage input that an earlier stage should have produced; the message names the command."""
