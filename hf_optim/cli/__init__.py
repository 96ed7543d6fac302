"""The ``hf-optim`` command line."""
