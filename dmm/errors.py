"""User-facing errors. The CLI prints them on one line and exits with status 2."""


class DMMError(Exception):
    """Base class for errors caused by user input or the environment, not by a bug."""


class DatasetError(DMMError):
    """A dataset is missing, unreadable or malformed."""


class ConfigError(DMMError):
    """A configuration value or command-line argument is invalid."""
