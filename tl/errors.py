"""One error family, so workflows can turn any bad input into one clear line and a non-zero exit."""


class TLError(Exception):
    """Base of every error that names a user's file, class or key."""


class ConfigError(TLError):
    """A config key, value or type is wrong (names the dotted key)."""


class DataError(TLError):
    """Input data is unusable (names the file or class)."""


class WeightsError(TLError):
    """A weights file is unreadable or does not fit the backbone (names the keys)."""


class TrainingError(TLError):
    """Training diverged or could not run (names the strategy, step and learning rate)."""


# The exit statuses of every workflow (docs/workflows.md, "Exit statuses"): one number per kind of outcome.
EXIT_OK = 0  # everything finished
EXIT_BUG = 1  # an unexpected error (a traceback is printed): a bug to report
EXIT_BAD_INPUT = 2  # a usage error or bad input, named in one line; nothing was half-written
EXIT_FAILED_CELLS = 3  # finished, but some cells failed (listed with their errors in summary.md)
EXIT_INCOMPLETE = 4  # interrupted: some cells did not finish; the same command resumes
EXIT_INTERRUPTED = 130  # stopped with Ctrl-C; the same command resumes


def grid_exit_status(failed: int, unfinished: int) -> int:
    """The exit status of a run of cells: incomplete before failed, failed before ok."""
    return EXIT_INCOMPLETE if unfinished else EXIT_FAILED_CELLS if failed else EXIT_OK
