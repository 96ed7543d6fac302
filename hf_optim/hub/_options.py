"""How files are downloaded from the Hub: the keywords every entry point passes to ``huggingface_hub``."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

__all__ = ["HubOptions"]


@dataclass(frozen=True)
class HubOptions:
    """How files are downloaded from the Hub (passed as they are to ``huggingface_hub``)."""

    token: str | bool | None = None
    cache_dir: str | os.PathLike[str] | None = None
    local_files_only: bool = False
    force_download: bool = False

    @property
    def cache_path(self) -> str | None:
        """``cache_dir`` as the string ``huggingface_hub`` takes (``None``: its default cache)."""
        return None if self.cache_dir is None else os.fspath(self.cache_dir)

    def only_cached(self, cache_only: bool = True) -> HubOptions:
        """The same options, downloading nothing when ``cache_only``."""
        return replace(self, local_files_only=self.local_files_only or cache_only)
