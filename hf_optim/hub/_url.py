"""Where on the Hub: ``hf://`` URLs, repo ids and the explicit ``revision`` / ``subfolder`` / ``repo_type``."""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub import parse_hf_uri
from huggingface_hub.errors import HfUriError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hf_optim._utils import clean_subfolder, is_hub_url

__all__ = ["REPO_TYPES", "HfUrl", "Location", "locate", "parse_hf_url"]

REPO_TYPES = ("model", "dataset", "space")
_GLOB_CHARACTERS = frozenset("*?[]")


@dataclass(frozen=True)
class HfUrl:
    """A parsed ``hf://[TYPE/]NAMESPACE/NAME[@REVISION][/SUBFOLDER]`` URL, as :func:`parse_hf_url` returns it.

    It names a folder of a Hub repository offline, without asking the Hub whether it exists.

    Args:
        repo_type: `"model"`, `"dataset"` or `"space"`.
        repo_id: `"namespace/name"`.
        revision: A branch, tag, commit or `refs/pr/N`; `None` means the default branch.
        subfolder: The folder inside the repository; `None` means its root.

    Example:
        ```python
        url = hf_optim.HfUrl("model", "me/run-1", "main", "checkpoint-500")
        assert url == hf_optim.parse_hf_url("hf://me/run-1@main/checkpoint-500")
        ```
    """

    repo_type: str
    repo_id: str
    revision: str | None = None
    subfolder: str | None = None


def parse_hf_url(url: str) -> HfUrl:
    """Parse an ``hf://`` URL (or a huggingface.co web URL) into repository, revision and subfolder, offline.

    The same URL form as ``huggingface_hub.HfFileSystem`` (parsed by ``huggingface_hub.parse_hf_uri``), so a
    checkpoint folder is named by one string everywhere: ``hf://USER/REPO[@REVISION][/SUBFOLDER]``;
    ``hf://datasets/USER/REPO/...`` and ``hf://spaces/...`` name other repo types. A revision containing ``/``
    is percent-encoded (``@refs%2Fpr%2F1``), except ``refs/pr/N``.

    Args:
        url (`str`): The URL to parse.

    Returns:
        The repo type, repo id, revision (`None` for the default branch) and subfolder (`None` for the
            root).

    Raises:
        ValueError: If `url` is not a valid `hf://` URL, or names something other than a model, dataset or
            space repository (a bucket, for example).

    Example:
        ```python
        url = hf_optim.parse_hf_url("hf://datasets/me/runs@v1/checkpoint-500")
        assert (url.repo_type, url.repo_id, url.revision, url.subfolder) == (
            "dataset", "me/runs", "v1", "checkpoint-500"
        )
        ```
    """
    try:
        parsed = parse_hf_uri(url)
    except HfUriError as err:
        raise ValueError(f"invalid hf:// URL {url!r}: {err}") from None
    if parsed.type not in REPO_TYPES:
        raise ValueError(
            f"hf:// URL {url!r} points to a {parsed.type}; optimizer state lives in a model, dataset or "
            "space repository"
        )
    return HfUrl(parsed.type, parsed.id, parsed.revision, parsed.path_in_repo.strip("/") or None)


@dataclass(frozen=True)
class Location:
    """A checked place on the Hub: repository, subfolder, revision and repo type (``None``: the defaults)."""

    repo_id: str
    subfolder: str | None
    revision: str | None
    repo_type: str | None

    def describe(self) -> str:
        where = f", subfolder {self.subfolder!r}" if self.subfolder else ""
        return f"{self.repo_id} (revision {self.revision or 'main'}{where})"


def _clean_subfolder(subfolder: str | None) -> str | None:
    """:func:`~hf_optim._utils.clean_subfolder`, without glob characters (it becomes a download pattern)."""
    cleaned = clean_subfolder(subfolder)
    if cleaned and _GLOB_CHARACTERS & set(cleaned):
        raise ValueError(f"subfolder must not contain glob characters (* ? [ ]), got {subfolder!r}")
    return cleaned


def _merge(name: str, explicit: str | None, from_url: str | None, url: str) -> str | None:
    if explicit is not None and from_url is not None and explicit != from_url:
        raise ValueError(f"{name}={explicit!r} conflicts with {from_url!r} in {url!r}")
    return explicit if explicit is not None else from_url


def locate(
    repo_id_or_url: str, subfolder: str | None, revision: str | None, repo_type: str | None
) -> Location:
    """Repo id, subfolder, revision and type from a repo id or an ``hf://`` URL plus explicit arguments."""
    repo_id = repo_id_or_url
    if is_hub_url(repo_id_or_url):
        url = parse_hf_url(repo_id_or_url)
        repo_id = url.repo_id
        revision = _merge("revision", revision, url.revision, repo_id_or_url)
        subfolder = _merge("subfolder", _clean_subfolder(subfolder), url.subfolder, repo_id_or_url)
        repo_type = _merge("repo_type", repo_type, url.repo_type, repo_id_or_url)
    else:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as err:
            raise ValueError(f"{repo_id!r} is not a valid Hub repo id: {err}") from None
    if repo_type is not None and repo_type not in REPO_TYPES:
        raise ValueError(f"repo_type must be one of {REPO_TYPES}, got {repo_type!r}")
    return Location(repo_id, _clean_subfolder(subfolder), revision, repo_type)
