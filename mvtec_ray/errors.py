"""Errors a person can act on. The CLI prints them as one line (traceback with --debug)."""


class UserError(Exception):
    """Bad input or configuration: printed as a one-line message, exit status 2."""


class CatalogError(UserError):
    """The dataset root does not follow the MVTec AD layout."""


class StorageError(UserError):
    """A bucket or path cannot be reached, listed or read."""


class StorageUnavailable(StorageError):
    """Transient storage failures (throttling, 5xx, network) outlasted the retries: not a bad
    input, so it fails the run (nothing marked complete) instead of becoming an error row."""


class StorageAccessDenied(StorageError):
    """Storage refused the credentials (403, expired or invalid token, bad signature): not a bad
    image, so like :class:`StorageUnavailable` it fails the run (resumable, nothing marked complete)
    instead of becoming an error row per image."""


class WeightsUnavailable(UserError):
    """Requested backbone weights cannot be had; the message names the alternatives."""


class ModelMismatch(UserError):
    """Saved models do not fit the features or images they are asked to score."""
