"""User-facing errors: every problem a user can cause is one of these, with a message that names it.

The CLI and the app print ``str(err)`` and never a traceback.
"""


def reason(err: BaseException) -> str:
    """What went wrong, for a message: an OSError's own words (its full text names the path it failed on,
    a server's temporary folder for an upload), else the error's text, else its type."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


class MrcnnError(Exception):
    """Base class: the message is meant for the user as it is."""


class ImageError(MrcnnError):
    """An image that cannot be read (missing, empty, truncated, not an image, too many pixels)."""


class CheckpointError(MrcnnError):
    """A checkpoint or weights file that is missing, corrupt, foreign or does not fit the architecture."""


class ModelUnavailable(MrcnnError):
    """A model whose weights are not on this machine (the message says how to get them)."""


class DatasetError(MrcnnError):
    """A dataset that cannot be used at all (per-item problems go into a validation report instead)."""


class TrainingError(MrcnnError):
    """A training run that cannot start or had to stop (bad config, non-finite loss)."""


class ExportError(MrcnnError):
    """A model that cannot be exported in the asked format, or whose export does not reproduce it."""


class VideoError(MrcnnError):
    """A video clip that cannot be used (not decodable, no video stream, truncated, over the limits)."""


class SettingError(MrcnnError):
    """A server limit set in an environment variable (MRCNN_MAX_PIXELS, ...) whose value cannot be used."""
