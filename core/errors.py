"""Errors a user can cause: each carries a one-line message; the CLI turns them into exit code 2.

Bugs stay ordinary exceptions. This module imports nothing, so every room may use it.
"""


class DetdeployError(Exception):
    """Base class of user-facing errors (bad input, bad flags, files that don't fit)."""


class UnknownModelError(DetdeployError):
    """A model name that is not in the registry."""


class CheckpointError(DetdeployError):
    """A checkpoint that cannot be read, is unsafe to read, or does not fit the architecture."""


class ImageError(DetdeployError):
    """An image that cannot be read or converted."""


class ImageTooLargeError(ImageError):
    """An image with more pixels than the limit in force (refused before decoding)."""


class ModelFileError(DetdeployError):
    """A model file that is unsafe to load, incomplete, or does not match its own description."""


class MetadataError(DetdeployError):
    """A model file without (complete, valid) detdeploy metadata."""


class OutputError(DetdeployError):
    """An output path that cannot be written, or exists under --no-overwrite."""


# every character str.splitlines() breaks a line at
_LINE_BREAKS = '\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029'


def one_line(text: str) -> str:
    """`text` on one line: line breaks (in file names, in a library's reason) shown escaped, as
    Python's repr shows them, so a message or verdict stays one line."""
    if not any(char in text for char in _LINE_BREAKS):
        return text
    return ''.join(repr(char)[1:-1] if char in _LINE_BREAKS else char for char in text)
