"""Exceptions raised by the library; the CLI turns each into a one-line message."""


class MediretError(Exception):
    """Base class of every error a user can act on."""


class DatasetFormatError(MediretError):
    """A dataset folder or file is not in a layout mediret can read."""


class EncoderError(MediretError):
    """An encoder is unknown or its weights cannot be loaded."""


class StoreError(MediretError):
    """A store is missing, inconsistent or incompatible with the request."""


class ClassifyError(MediretError):
    """Classification cannot run on the given store or options."""


class SearchError(MediretError):
    """A search query or retrieval evaluation is invalid."""
