"""Integrations with other libraries (transformers, accelerate).

Each submodule may import its library; ``import hf_optim`` never imports them (see ``hf_optim._EXPORTS``).
"""
