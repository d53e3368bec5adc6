"""User-facing errors.

A :class:`KdpipeError` is a problem with the user's input (a file, a folder, a params key). The CLI
prints its message without a traceback (unless ``--debug``) and exits with status 2, so a message
must name the file or key and say what is wrong with it.
"""


class KdpipeError(Exception):
    """An error caused by input the user can fix; its message is shown as is."""


class ParamsError(KdpipeError):
    """params.yaml (or an override) is invalid."""


class DataError(KdpipeError):
    """The data folder is unusable (missing folders, no classes, no valid images...)."""


class IntegrityError(KdpipeError):
    """An input does not match the content hash recorded in its manifest."""
