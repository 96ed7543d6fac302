"""HubStorage without HTTP: validation, all-or-nothing commits, concurrency, on-disk layout."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from hf_optim.hub_server.storage import (
    AddFile,
    BadRequest,
    Conflict,
    DeleteFile,
    EntryNotFound,
    HubStorage,
    PreconditionFailed,
    RepoNotFound,
    RevisionNotFound,
    TreeView,
)

REPO = "local-user/unit"


@pytest.fixture
def storage(tmp_path: Path) -> HubStorage:
    s = HubStorage(tmp_path / "hub", lfs_extensions=[".safetensors", "bin"], fsync=False)
    s.create_repo("model", REPO)
    return s


def head(storage: HubStorage, revision: str = "main") -> str:
    return storage.resolve(storage.get_repo("model", REPO), revision)


def commit_files(storage: HubStorage, revision: str = "main") -> dict[str, bytes]:
    files = storage.load_commit("model", REPO, head(storage, revision)).files
    return {path: storage.read_blob(entry.sha256) for path, entry in files.items()}


def test_new_repo_has_initial_commit_with_gitattributes(storage: HubStorage) -> None:
    files = commit_files(storage)
    assert list(files) == [".gitattributes"]
    assert b"*.safetensors filter=lfs diff=lfs merge=lfs -text" in files[".gitattributes"]
    assert b"*.bin filter=lfs" in files[".gitattributes"]
    with pytest.raises(Conflict):
        storage.create_repo("model", REPO)
    storage.create_repo("dataset", REPO)  # another type, another namespace of repos
    assert storage.get_repo("dataset", REPO)["type"] == "dataset"


def test_upload_mode_follows_extensions(storage: HubStorage) -> None:
    assert storage.upload_mode("a/optimizer.safetensors", 10) == "lfs"
    assert storage.upload_mode("W.BIN", 10) == "lfs"
    assert storage.upload_mode("empty.safetensors", 0) == "regular"  # git-lfs cannot store empty objects
    assert storage.upload_mode("scheduler.json", 10) == "regular"
    assert HubStorage(storage.root).upload_mode("x.safetensors", 10) == "regular"  # default: no LFS at all


def test_failed_commit_changes_nothing(storage: HubStorage) -> None:
    before = head(storage)
    ok = storage.put_bytes(b"content")
    with pytest.raises(EntryNotFound):
        storage.commit(
            "model", REPO, "main", [AddFile("new.txt", ok), DeleteFile("missing.txt")], summary="half"
        )
    with pytest.raises(BadRequest, match="both a file and a folder"):
        storage.commit("model", REPO, "main", [AddFile("a", ok), AddFile("a/b", ok)], summary="clash")
    with pytest.raises(PreconditionFailed):
        storage.commit("model", REPO, "main", [AddFile("x", ok)], summary="stale", parent_commit="0" * 40)
    with pytest.raises(BadRequest, match="summary"):
        storage.commit("model", REPO, "main", [AddFile("x", ok)], summary="")
    assert head(storage) == before
    commits_dir = storage.root / "repos" / "models" / "local-user" / "unit" / "commits"
    assert [p.stem for p in commits_dir.iterdir()] == [before]


def test_commit_ops_and_history(storage: HubStorage) -> None:
    first = head(storage)
    c1, _ = storage.commit(
        "model",
        REPO,
        "main",
        [AddFile("d/a.txt", storage.put_bytes(b"a")), AddFile("d/e/b.txt", storage.put_bytes(b"b"))],
        summary="add",
    )
    c2, _ = storage.commit("model", REPO, "main", [DeleteFile("d/e/", folder=True)], summary="rm folder")
    assert commit_files(storage) == {
        ".gitattributes": commit_files(storage, first)[".gitattributes"],
        "d/a.txt": b"a",
    }
    assert [c.id for c in storage.history("model", REPO, c2.id)] == [c2.id, c1.id, first]
    assert c2.parents == (c1.id,)
    assert all(len(c) == 40 and int(c, 16) >= 0 for c in (first, c1.id, c2.id))
    # Short commit ids resolve when unique.
    assert storage.resolve(storage.get_repo("model", REPO), c1.id[:8]) == c1.id


def test_pull_request_commit_leaves_branch_alone(storage: HubStorage) -> None:
    base = head(storage)
    commit, num = storage.commit(
        "model", REPO, "main", [AddFile("p.txt", storage.put_bytes(b"p"))], summary="pr", create_pr=True
    )
    assert num == 1 and head(storage) == base and head(storage, "refs/pr/1") == commit.id
    assert storage.get_discussion(storage.get_repo("model", REPO), 1)["isPullRequest"] is True
    with pytest.raises(RevisionNotFound):
        storage.commit("model", REPO, "nope", [], summary="x")
    storage.create_tag("model", REPO, "v1", "main")
    with pytest.raises(BadRequest, match="not a branch"):
        storage.commit("model", REPO, "v1", [], summary="x")  # tags cannot be committed to


@pytest.mark.parametrize(
    ("repo_id", "fragment"),
    [
        ("no-namespace", "namespace/name"),
        ("a/b/c", "namespace/name"),
        ("a/b..c", "'..'"),
        ("a/b--c", "'--'"),
        ("a/.hidden", "start with"),
        ("a/name.git", ".git"),
    ],
)
def test_invalid_repo_ids_are_rejected(tmp_path: Path, repo_id: str, fragment: str) -> None:
    s = HubStorage(tmp_path / "hub", fsync=False)
    with pytest.raises(BadRequest) as excinfo:
        s.create_repo("model", repo_id)
    assert fragment in excinfo.value.message
    with pytest.raises(RepoNotFound):
        s.get_repo("model", repo_id)


@pytest.mark.parametrize("path", ["/abs", "a//b", "a/../b", "./a", "a/", ".git/config", "a\\b", ""])
def test_invalid_paths_are_rejected(storage: HubStorage, path: str) -> None:
    with pytest.raises(BadRequest, match="Invalid path"):
        storage.commit("model", REPO, "main", [AddFile(path, storage.put_bytes(b"x"))], summary="bad")


def test_lfs_objects_are_verified_and_private_to_their_repo(storage: HubStorage) -> None:
    data = os.urandom(1000)
    good = hashlib.sha256(data).hexdigest()
    with pytest.raises(BadRequest, match="was not uploaded"):
        storage.lfs_entry("model", REPO, good)
    chunks = iter([data[:300], data[300:], b""])
    with pytest.raises(BadRequest, match="sha256"):
        storage.stage_upload("model", REPO, lambda n: next(chunks), sha256="0" * 64, size=1000)
    chunks = iter([data, b"extra", b""])
    with pytest.raises(BadRequest, match="exceeds the expected 1000 bytes"):
        storage.stage_upload("model", REPO, lambda n: next(chunks), sha256=good, size=1000)
    assert not storage.repo_has_lfs("model", REPO, good)
    assert list((storage.root / "tmp").iterdir()) == []  # nothing left behind

    chunks = iter([data[:300], data[300:], b""])
    storage.stage_upload("model", REPO, lambda n: next(chunks), sha256=good, size=1000)
    # Uploaded, not committed: usable by a commit of this repo only, held by no commit, not in the shared store.
    assert storage.repo_has_lfs("model", REPO, good) and not storage.repo_holds_lfs("model", REPO, good)
    assert not storage.has_blob(good)
    storage.create_repo("model", "local-user/other")
    with pytest.raises(BadRequest, match="was not uploaded to local-user/other"):
        storage.lfs_entry("model", "local-user/other", good)
    entry = storage.lfs_entry("model", REPO, good, 1000)
    assert entry.lfs and entry.size == 1000
    with pytest.raises(BadRequest, match="1000 bytes"):
        storage.lfs_entry("model", REPO, good, 999)

    storage.commit("model", REPO, "main", [AddFile("w.safetensors", entry)], summary="lfs")
    assert storage.repo_holds_lfs("model", REPO, good) and storage.read_blob(good) == data
    assert not storage.repo_holds_lfs("model", "local-user/other", good)
    assert list((storage.root / "repos/models/local-user/unit/uploads").iterdir()) == []


def test_stale_uploads_are_pruned(storage: HubStorage) -> None:
    data = b"never committed"
    oid = hashlib.sha256(data).hexdigest()
    chunks = iter([data, b""])
    storage.stage_upload("model", REPO, lambda n: next(chunks), sha256=oid, size=len(data))
    assert storage.prune_uploads(max_age=3600) == 0
    staged = storage.root / "repos/models/local-user/unit/uploads" / oid
    os.utime(staged, (0, 0))
    assert storage.prune_uploads(max_age=3600) == 1
    assert not staged.exists() and not storage.repo_has_lfs("model", REPO, oid)


def test_lfs_index_is_rebuilt_for_repos_stored_without_it(storage: HubStorage) -> None:
    data = b"weights"
    oid = hashlib.sha256(data).hexdigest()
    chunks = iter([data, b""])
    storage.stage_upload("model", REPO, lambda n: next(chunks), sha256=oid, size=len(data))
    storage.commit(
        "model", REPO, "main", [AddFile("w.bin", storage.lfs_entry("model", REPO, oid))], summary="w"
    )
    shutil.rmtree(storage.root / "repos/models/local-user/unit/lfs-objects")  # as written by an older version
    assert storage.repo_holds_lfs("model", REPO, oid)
    assert not storage.repo_holds_lfs("model", REPO, hashlib.sha256(b"other").hexdigest())


def test_concurrent_commits_from_threads_form_a_linear_history(storage: HubStorage) -> None:
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(5):
                storage.commit(
                    "model",
                    REPO,
                    "main",
                    [AddFile(f"t{i}/{j}.txt", storage.put_bytes(f"{i}-{j}".encode()))],
                    summary=f"{i}-{j}",
                )
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    history = list(storage.history("model", REPO, head(storage)))
    assert len(history) == 1 + 20
    files = commit_files(storage)
    assert {p: v for p, v in files.items() if p != ".gitattributes"} == {
        f"t{i}/{j}.txt": f"{i}-{j}".encode() for i in range(4) for j in range(5)
    }


def test_root_must_be_empty_or_a_hub(tmp_path: Path) -> None:
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.csv").write_text("1,2")
    with pytest.raises(ValueError, match="neither empty nor a local Hub"):
        HubStorage(tmp_path / "foreign")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "hf-optim-hub.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="format 99"):
        HubStorage(tmp_path / "old")


def test_tree_view_listings() -> None:
    from hf_optim.hub_server.storage import FileEntry

    e = FileEntry(sha256="0" * 64, size=1, oid="1" * 40)
    view = TreeView({"a.txt": e, "d/b.txt": e, "d/e/c.txt": e})
    assert view.listing("", recursive=False) == ["d", "a.txt"]
    assert view.listing("", recursive=True) == ["d", "d/e", "a.txt", "d/b.txt", "d/e/c.txt"]
    assert view.listing("d", recursive=False) == ["d/e", "d/b.txt"]
    assert view.is_dir("d/e") and not view.is_dir("a.txt")
    # Folder ids change when anything below changes, and only then.
    other = TreeView(
        {"a.txt": e, "d/b.txt": e, "d/e/c.txt": FileEntry(sha256="0" * 64, size=1, oid="2" * 40)}
    )
    assert other.dir_oid("d") != view.dir_oid("d") and other.dir_oid("d/e") != view.dir_oid("d/e")
    assert TreeView(dict(view.files)).dir_oid("d") == view.dir_oid("d")


def _upload_and_commit(storage: HubStorage, repo_id: str, data: bytes) -> str:
    oid = hashlib.sha256(data).hexdigest()
    chunks = iter([data, b""])
    storage.stage_upload("model", repo_id, lambda n: next(chunks), sha256=oid, size=len(data))
    entry = storage.lfs_entry("model", repo_id, oid)
    storage.commit("model", repo_id, "main", [AddFile("w.bin", entry)], summary="w")
    return oid


def test_lfs_objects_follow_moves_and_die_with_their_repo(storage: HubStorage) -> None:
    oid = _upload_and_commit(storage, REPO, b"moved weights")
    storage.move_repo("model", REPO, "local-user/renamed")
    assert storage.repo_holds_lfs("model", "local-user/renamed", oid)
    assert storage.lfs_entry("model", "local-user/renamed", oid).size == len(b"moved weights")

    storage.delete_repo("model", "local-user/renamed")
    storage.create_repo("model", "local-user/renamed")  # same name, new repo: inherits nothing
    assert not storage.repo_holds_lfs("model", "local-user/renamed", oid)
    with pytest.raises(BadRequest, match="was not uploaded"):
        storage.lfs_entry("model", "local-user/renamed", oid)
    with pytest.raises(RepoNotFound):
        storage.repo_holds_lfs("model", "local-user/never-created", oid)
