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
