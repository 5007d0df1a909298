"""Error types: every expected failure is one of these, with a one-line message."""


class EmnistCnnError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero."""

    exit_code = 1


class DataError(EmnistCnnError):
    """A data file is missing, truncated, corrupt or inconsistent."""


class DownloadError(EmnistCnnError):
    """A download failed, stalled, or did not match its checksum."""


class ConfigError(EmnistCnnError):
    """A setting is out of range or conflicts with an existing run."""

    exit_code = 2


class RunDirError(EmnistCnnError):
    """A run directory is locked, unwritable or holds unreadable state."""
