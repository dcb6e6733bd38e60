"""The error raised for unusable data (kept in its own module so loader workers can re-raise it)."""


class DataError(ValueError):
    """The data path, a split, a class folder or an image cannot be used."""
