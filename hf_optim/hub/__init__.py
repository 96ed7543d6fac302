"""Optimizer state on the Hugging Face Hub: push in one commit, download into the HF cache, ``hf://`` URLs.

Every Hub call goes through ``huggingface_hub`` (``HfApi.create_repo`` / ``create_branch`` / ``upload_folder``,
``hf_hub_download``, ``snapshot_download``), so ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, the cache
layout and the progress bars behave as everywhere else in the ecosystem. :func:`load_state` downloads the
manifest (``optimizer.safetensors`` or the index) first and then exactly the files it references, like
transformers does for sharded weights; :func:`download_checkpoint` fetches a whole checkpoint folder, for
resuming a Trainer or Accelerate run. :func:`load_state` and :func:`inspect_state` are ``hf_optim.state``'s
with Hub repo ids and ``hf://`` URLs added.

Every entry point takes the same Hub keywords: ``repo_type``, ``revision``, ``subfolder``, ``token``,
``cache_dir``, ``local_files_only``, ``force_download``.

Modules: ``_url`` (``hf://`` URLs, repo ids), ``_options`` (download keywords), ``_download`` (checkpoint
folders, manifests and the files they reference), ``_load`` (load / inspect / resolve from a path or the Hub),
``_push`` (save and upload in one commit).
"""

from hf_optim.hub._download import download_checkpoint
from hf_optim.hub._load import inspect_state, load_state, resolve_state_dir
from hf_optim.hub._push import push_state_to_hub
from hf_optim.hub._url import HfUrl, parse_hf_url

__all__ = [
    "HfUrl",
    "download_checkpoint",
    "inspect_state",
    "load_state",
    "parse_hf_url",
    "push_state_to_hub",
    "resolve_state_dir",
]
