"""The error raised when the output folder cannot hold this run."""


class RunFolderError(RuntimeError):
    """The output folder is locked by another run, cannot be written, is full, or holds a run
    with other settings."""
