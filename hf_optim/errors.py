"""hf_optim's exceptions, in one place.

Wrong types raise ``TypeError`` and bad values ``ValueError``, as torch does; the classes below are for what
neither says well.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "TransformersIntegrationError"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted, inconsistent, hostile or of an unknown format version.

    The message names the file (and the parameter or key) at fault.
    """


class TransformersIntegrationError(RuntimeError):
    """transformers' internals are not what hf_optim expects (the message names the transformers version)."""
