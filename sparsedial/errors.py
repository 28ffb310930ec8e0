"""Exceptions shared by the whole package. Each message says what is wrong and where."""


class SparsedialError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero, the server maps them to 4xx."""


class ModelLoadError(SparsedialError):
    """A model directory cannot be loaded: missing, corrupt or inconsistent files or tensors."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture or one of its options is not implemented by sparsedial's runtime."""
