"""The two ways a command fails, each with its exit code: bad input (2) and a failed check (1)."""


class ModelSqueezeError(Exception):
    """Bad usage or bad input: the command prints one line and exits 2."""

    exit_code = 2


class CheckFailed(ModelSqueezeError):
    """A threshold or check the user asked for did not hold: exit 1."""

    exit_code = 1
