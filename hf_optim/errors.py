"""hf_optim's exceptions, in one place, and the policy for which one is raised.

- ``TypeError``: an argument (or a value inside one) of the wrong type, e.g. ``lr="1e-3"``, a ``model`` that is
  not an ``nn.Module``, a schedule name where a schedule object is needed; the message says what was expected
  and names the type given.
- ``ValueError``: the right type with a bad value, e.g. ``lr=-1``, ``betas=(0.9,)``, an unknown optimizer name
  (with the closest names), ``lr * weight_decay > 1``.
- :class:`CheckpointError` (a ``ValueError``): anything wrong with what is *read*: a checkpoint file missing,
  truncated, corrupted, inconsistent, hostile, of an unknown format version, or holding values the live objects
  refuse. A type or value error raised while checking a file's contents becomes a ``CheckpointError`` naming the
  file, so a caller catches one class for every bad checkpoint.
- :class:`TransformersIntegrationError` / :class:`AccelerateIntegrationError` (both ``RuntimeError``):
  transformers' / Accelerate's internals are not what hf_optim expects.
- ``RuntimeError``: the operation cannot run in the current state (a sparse gradient, a process group that
  disagrees).

``tests/test_errors.py`` scans the package for ``ValueError`` raised with a message about a type.
"""

from __future__ import annotations

__all__ = ["AccelerateIntegrationError", "CheckpointError", "TransformersIntegrationError"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted, inconsistent, hostile or of an unknown format version.

    The message names the file (and the parameter or key) at fault. It is a ``ValueError``, so code that
    catches bad values catches it too; a load that raises it has changed nothing.

    Example:
        ```python
        import torch
        import hf_optim

        optimizer = hf_optim.AdamW(torch.nn.Linear(2, 2).parameters())
        hf_optim.save_state("ckpt", optimizer)
        with open(f"ckpt/{hf_optim.OPTIMIZER_NAME}", "r+b") as f:
            f.truncate(100)  # a cut-off download
        try:
            hf_optim.load_state("ckpt", optimizer)
        except hf_optim.CheckpointError as err:
            assert hf_optim.OPTIMIZER_NAME in str(err)
        else:
            raise AssertionError("a truncated file must not load")
        ```
    """


class TransformersIntegrationError(RuntimeError):
    """transformers' internals are not what hf_optim expects (the message names the transformers version)."""


class AccelerateIntegrationError(RuntimeError):
    """Accelerate's internals are not what hf_optim expects (the message names the Accelerate version)."""
