"""Error types: every expected failure is one of these, with a one-line message."""

__all__ = ["EmnistCnnError", "DataError", "DownloadError", "ConfigError", "RunDirError", "WeightsError",
           "ImageError", "ExportError", "format_one_line"]


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


class WeightsError(DataError):
    """A weights file is unreadable, truncated, foreign, or does not fit the model."""


class ImageError(DataError):
    """An image file is missing, unreadable, or holds no character."""


class ExportError(EmnistCnnError):
    """A model could not be written in a requested format."""


def format_one_line(exc: BaseException, limit: int = 300) -> str:
    """A library exception's text on one line, cut at `limit` characters."""
    text = " ".join(str(exc).split())
    return text[:limit] + ("..." if len(text) > limit else "")
