"""The real huggingface_hub client against the session's local Hub (tests/conftest.py) over HTTP.

References are independent of the server: bytes are compared with what was uploaded, file ids with
``git hash-object`` (git's own implementation), LFS ids with ``hashlib.sha256`` and the git-lfs pointer format
written out here, Range answers with slices of the uploaded bytes.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get

from hf_optim.hub_server import HubStorage


def git_hash_object(data: bytes) -> str:
    """git's object id of a blob, computed by git itself (its documented formula if git is missing)."""
    git = shutil.which("git")
    if git is not None:
        out = subprocess.run([git, "hash-object", "--stdin"], input=data, capture_output=True, check=True)
        return out.stdout.decode().strip()
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs v1 pointer file of ``data`` (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md)."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n".encode()


def read_bytes(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def files_under(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(folder).parts
    }


def test_create_repo_conflict_exist_ok_and_whoami(hub_api: HfApi, hub_repo_id: str) -> None:
    url = hub_api.create_repo(hub_repo_id)
    assert url.repo_id == hub_repo_id
    assert url.repo_type == "model"
    with pytest.raises(HfHubHTTPError) as excinfo:
        hub_api.create_repo(hub_repo_id)
    assert excinfo.value.response.status_code == 409
    assert hub_api.create_repo(hub_repo_id, exist_ok=True).repo_id == hub_repo_id
    assert hub_api.repo_exists(hub_repo_id)
    assert not hub_api.repo_exists(hub_repo_id + "-missing")
    assert hub_api.whoami()["name"] == "local-user"
    # No namespace: the repo goes to the token's user, as on the Hub.
    bare = hub_repo_id.split("/")[1] + "-bare"
    assert hub_api.create_repo(bare).repo_id == f"local-user/{bare}"


def test_upload_file_and_download(hub_api: HfApi, hub_repo_id: str) -> None:
    hub_api.create_repo(hub_repo_id)
    data = os.urandom(3000) + b"\n"
    info = hub_api.upload_file(path_or_fileobj=data, path_in_repo="dir/data.bin", repo_id=hub_repo_id)
    assert len(info.oid) == 40 and int(info.oid, 16) >= 0
    assert info.commit_url.endswith(f"/{hub_repo_id}/commit/{info.oid}")

    path = hf_hub_download(hub_repo_id, "dir/data.bin")
    assert read_bytes(path) == data
    meta = get_hf_file_metadata(hf_hub_url(hub_repo_id, "dir/data.bin"))
    assert meta.commit_hash == info.oid
    assert meta.etag == git_hash_object(data)
    assert meta.size == len(data)
    # Pinned to the commit id: same cached file.
    assert read_bytes(hf_hub_download(hub_repo_id, "dir/data.bin", revision=info.oid)) == data

    # Names that need URL-encoding, and an empty file.
    odd = "dir with space/ünï cödé #1%2F.txt"
    hub_api.upload_file(path_or_fileobj=b"odd", path_in_repo=odd, repo_id=hub_repo_id)
    assert read_bytes(hf_hub_download(hub_repo_id, odd)) == b"odd"
    hub_api.upload_file(path_or_fileobj=b"", path_in_repo="empty.txt", repo_id=hub_repo_id)
    assert read_bytes(hf_hub_download(hub_repo_id, "empty.txt")) == b""
    assert get_hf_file_metadata(hf_hub_url(hub_repo_id, "empty.txt")).etag == git_hash_object(b"")

    # README uploads go through /api/validate-yaml first.
    readme = b"---\nlicense: apache-2.0\n---\n# Optimizer state\n"
    hub_api.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id=hub_repo_id)
    assert read_bytes(hf_hub_download(hub_repo_id, "README.md")) == readme


def test_upload_folder_snapshot_allow_patterns_and_subfolder(
    hub_api: HfApi, hub_repo_id: str, tmp_path: Path
) -> None:
    local = tmp_path / "local"
    contents = {
        "a.txt": b"alpha\n",
        "sub/b.json": json.dumps({"b": 1}).encode(),
        "sub/deep/c.bin": os.urandom(777),
        "other/d.txt": b"delta",
    }
    for rel, data in contents.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    hub_api.create_repo(hub_repo_id)
    hub_api.upload_folder(folder_path=local, repo_id=hub_repo_id, path_in_repo="ckpt")

    expected = {f"ckpt/{rel}": data for rel, data in contents.items()}
    assert sorted(hub_api.list_repo_files(hub_repo_id)) == sorted([*expected, ".gitattributes"])

    snap = Path(snapshot_download(hub_repo_id))
    snapped = files_under(snap)
    assert set(snapped) == {*expected, ".gitattributes"}
    assert all(snapped[k] == v for k, v in expected.items())

    only_sub = Path(snapshot_download(hub_repo_id, allow_patterns=["ckpt/sub/*"], local_dir=tmp_path / "dl"))
    assert files_under(only_sub) == {k: v for k, v in expected.items() if k.startswith("ckpt/sub/")}

    got = hf_hub_download(hub_repo_id, "b.json", subfolder="ckpt/sub")
    assert read_bytes(got) == contents["sub/b.json"]


def test_revisions_branches_commit_ids_tags_and_pull_requests(hub_api: HfApi, hub_repo_id: str) -> None:
    hub_api.create_repo(hub_repo_id)
    c1 = hub_api.upload_file(path_or_fileobj=b"v1", path_in_repo="f.txt", repo_id=hub_repo_id)
    hub_api.create_branch(hub_repo_id, branch="dev")
    with pytest.raises(HfHubHTTPError) as excinfo:
        hub_api.create_branch(hub_repo_id, branch="dev")
    assert excinfo.value.response.status_code == 409
    hub_api.create_branch(hub_repo_id, branch="dev", exist_ok=True)
    c2 = hub_api.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id=hub_repo_id)
    c3 = hub_api.upload_file(
        path_or_fileobj=b"dev", path_in_repo="dev-only.txt", repo_id=hub_repo_id, revision="dev"
    )

    assert read_bytes(hf_hub_download(hub_repo_id, "f.txt")) == b"v2"
    assert read_bytes(hf_hub_download(hub_repo_id, "f.txt", revision=c1.oid)) == b"v1"
    assert read_bytes(hf_hub_download(hub_repo_id, "f.txt", revision=c1.oid[:10])) == b"v1"
    assert read_bytes(hf_hub_download(hub_repo_id, "f.txt", revision="dev")) == b"v1"
    assert read_bytes(hf_hub_download(hub_repo_id, "dev-only.txt", revision="dev")) == b"dev"
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(hub_repo_id, "dev-only.txt")

    pr1 = hub_api.upload_file(
        path_or_fileobj=b"pr", path_in_repo="pr.txt", repo_id=hub_repo_id, create_pr=True
    )
    assert (pr1.pr_revision, pr1.pr_num) == ("refs/pr/1", 1)
    assert pr1.pr_url.endswith(f"/{hub_repo_id}/discussions/1")
    assert read_bytes(hf_hub_download(hub_repo_id, "pr.txt", revision="refs/pr/1")) == b"pr"
    assert read_bytes(hf_hub_download(hub_repo_id, "f.txt", revision="refs/pr/1")) == b"v2"
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(hub_repo_id, "pr.txt")  # main did not move
    pr2 = hub_api.upload_file(
        path_or_fileobj=b"pr2", path_in_repo="pr2.txt", repo_id=hub_repo_id, create_pr=True
    )
    assert pr2.pr_num == 2
    # Pushing again to an open PR moves its ref.
    pr1b = hub_api.upload_file(
        path_or_fileobj=b"more", path_in_repo="more.txt", repo_id=hub_repo_id, revision="refs/pr/1"
    )
    assert hub_api.model_info(hub_repo_id, revision="refs/pr/1").sha == pr1b.oid

    refs = hub_api.list_repo_refs(hub_repo_id, include_pull_requests=True)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": c2.oid, "dev": c3.oid}
    assert [(p.ref, p.target_commit) for p in refs.pull_requests] == [
        ("refs/pr/1", pr1b.oid),
        ("refs/pr/2", pr2.oid),
    ]

    commits = hub_api.list_repo_commits(hub_repo_id)
    assert [c.commit_id for c in commits][:2] == [c2.oid, c1.oid]
    assert len(commits) == 3  # + the initial commit
    assert commits[0].title == "Upload f.txt with huggingface_hub"

    hub_api.create_tag(hub_repo_id, tag="v1.0", revision=c1.oid)
    assert read_bytes(hf_hub_download(hub_repo_id, "f.txt", revision="v1.0")) == b"v1"
    assert [t.target_commit for t in hub_api.list_repo_refs(hub_repo_id).tags] == [c1.oid]
    hub_api.delete_tag(hub_repo_id, tag="v1.0")
    hub_api.delete_branch(hub_repo_id, branch="dev")
    with pytest.raises(RevisionNotFoundError):
        hub_api.model_info(hub_repo_id, revision="dev")


def test_parent_commit_is_checked_and_failed_commit_changes_nothing(hub_api: HfApi, hub_repo_id: str) -> None:
    hub_api.create_repo(hub_repo_id)
    c1 = hub_api.upload_file(path_or_fileobj=b"a", path_in_repo="a.txt", repo_id=hub_repo_id)
    c2 = hub_api.upload_file(path_or_fileobj=b"b", path_in_repo="b.txt", repo_id=hub_repo_id)
    with pytest.raises(HfHubHTTPError) as excinfo:
        hub_api.create_commit(
            hub_repo_id,
            [CommitOperationAdd("c.txt", b"c")],
            commit_message="stale",
            parent_commit=c1.oid,
        )
    assert excinfo.value.response.status_code == 412
    assert hub_api.model_info(hub_repo_id).sha == c2.oid
    assert not hub_api.file_exists(hub_repo_id, "c.txt")

    ok = hub_api.create_commit(
        hub_repo_id, [CommitOperationAdd("c.txt", b"c")], commit_message="fresh", parent_commit=c2.oid[:7]
    )
    assert hub_api.model_info(hub_repo_id).sha == ok.oid

    # create_pr + parent_commit: the pull request starts from that older commit.
    pr = hub_api.create_commit(
        hub_repo_id,
        [CommitOperationAdd("p.txt", b"p")],
        commit_message="from c1",
        parent_commit=c1.oid,
        create_pr=True,
    )
    assert sorted(hub_api.list_repo_files(hub_repo_id, revision=pr.pr_revision)) == [
        ".gitattributes",
        "a.txt",
        "p.txt",
    ]


def test_error_classes(hub_api: HfApi, hub_repo_id: str, hub_server) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(hub_repo_id, "x.txt")
    with pytest.raises(RepositoryNotFoundError):
        hub_api.model_info(hub_repo_id)
    hub_api.create_repo(hub_repo_id)
    hub_api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=hub_repo_id)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(hub_repo_id, "x.txt", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(hub_repo_id, revision="no-such-branch")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(hub_repo_id, "missing.txt")
    assert hub_api.file_exists(hub_repo_id, "x.txt")
    assert not hub_api.file_exists(hub_repo_id, "missing.txt")
    with pytest.raises(EntryNotFoundError):
        hub_api.delete_file("missing.txt", repo_id=hub_repo_id)
    # Writes need a token (any string).
    anonymous = HfApi(endpoint=hub_server.endpoint, token=False)
    with pytest.raises(HfHubHTTPError) as excinfo:
        anonymous.create_repo(hub_repo_id + "-anon")
    assert excinfo.value.response.status_code == 401
    assert "token" in str(excinfo.value)


def test_lfs_upload_with_xet_disabled(hub_api: HfApi, hub_repo_id: str, hub_server) -> None:
    assert os.environ["HF_HUB_DISABLE_XET"] == "1"
    hub_api.create_repo(hub_repo_id)
    weights = os.urandom(50_000)
    info = hub_api.upload_file(
        path_or_fileobj=weights, path_in_repo="state/optimizer.safetensors", repo_id=hub_repo_id
    )
    hub_api.upload_file(path_or_fileobj=b"{}", path_in_repo="state/scheduler.json", repo_id=hub_repo_id)

    tree = {f.path: f for f in hub_api.list_repo_tree(hub_repo_id, recursive=True) if hasattr(f, "size")}
    lfs_file = tree["state/optimizer.safetensors"]
    assert lfs_file.lfs is not None
    assert lfs_file.lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert lfs_file.lfs.size == lfs_file.size == len(weights)
    assert lfs_file.lfs.pointer_size == len(lfs_pointer(weights))
    assert lfs_file.blob_id == git_hash_object(lfs_pointer(weights))
    assert tree["state/scheduler.json"].lfs is None
    assert tree["state/scheduler.json"].blob_id == git_hash_object(b"{}")

    # What the server persisted: an LFS entry whose blob holds exactly the uploaded bytes.
    storage = HubStorage(hub_server.root)
    entry = storage.load_commit("model", hub_repo_id, info.oid).files["state/optimizer.safetensors"]
    assert entry.lfs and storage.read_blob(entry.sha256) == weights

    assert read_bytes(hf_hub_download(hub_repo_id, "state/optimizer.safetensors")) == weights
    meta = get_hf_file_metadata(hf_hub_url(hub_repo_id, "state/optimizer.safetensors"))
    assert meta.etag == hashlib.sha256(weights).hexdigest()
    assert meta.size == len(weights)

    # Same content again: the client sees the remote oid is unchanged and makes no commit.
    again = hub_api.upload_file(
        path_or_fileobj=weights, path_in_repo="state/optimizer.safetensors", repo_id=hub_repo_id
    )
    assert again.oid == hub_api.model_info(hub_repo_id).sha
    assert len(hub_api.list_repo_commits(hub_repo_id)) == 3  # initial + 2 uploads: the re-upload made none
    # Same content under another name: a copy of the stored LFS object, no new upload needed.
    hub_api.upload_file(path_or_fileobj=weights, path_in_repo="copy.safetensors", repo_id=hub_repo_id)
    assert read_bytes(hf_hub_download(hub_repo_id, "copy.safetensors")) == weights


def test_hf_file_system(hub_api: HfApi, hub_repo_id: str, hub_server) -> None:
    hub_api.create_repo(hub_repo_id)
    big = os.urandom(20_000)
    ops = [
        CommitOperationAdd("ckpt/a.txt", b"aaa"),
        CommitOperationAdd("ckpt/big.bin", big),
        CommitOperationAdd("ckpt/inner/state.safetensors", b"s" * 100),
        CommitOperationAdd("top.txt", b"top"),
    ]
    hub_api.create_commit(hub_repo_id, ops, commit_message="files")
    hub_api.create_branch(hub_repo_id, branch="exp")
    hub_api.upload_file(
        path_or_fileobj=b"exp", path_in_repo="ckpt/a.txt", repo_id=hub_repo_id, revision="exp"
    )
    hub_api.upload_file(
        path_or_fileobj=b"pr", path_in_repo="ckpt/pr.txt", repo_id=hub_repo_id, create_pr=True
    )

    fs = HfFileSystem(endpoint=hub_server.endpoint, token=hub_server.token, skip_instance_cache=True)
    assert sorted(fs.ls(f"{hub_repo_id}/ckpt", detail=False)) == [
        f"{hub_repo_id}/ckpt/a.txt",
        f"{hub_repo_id}/ckpt/big.bin",
        f"{hub_repo_id}/ckpt/inner",
    ]
    assert fs.exists(f"hf://{hub_repo_id}/ckpt/a.txt")
    assert not fs.exists(f"hf://{hub_repo_id}/ckpt/nope.txt")
    assert not fs.exists(f"hf://{hub_repo_id}-missing/ckpt")
    assert fs.isdir(f"{hub_repo_id}/ckpt/inner") and fs.isfile(f"{hub_repo_id}/top.txt")
    assert fs.info(f"{hub_repo_id}/ckpt/big.bin")["size"] == len(big)
    assert sorted(fs.find(f"{hub_repo_id}/ckpt")) == [
        f"{hub_repo_id}/ckpt/a.txt",
        f"{hub_repo_id}/ckpt/big.bin",
        f"{hub_repo_id}/ckpt/inner/state.safetensors",
    ]

    with fs.open(f"hf://{hub_repo_id}@exp/ckpt/a.txt", "rb") as f:
        assert f.read() == b"exp"
    with fs.open(f"hf://{hub_repo_id}/ckpt/big.bin", "rb", block_size=1000) as f:  # ranged reads
        f.seek(12_345)
        assert f.read(4321) == big[12_345 : 12_345 + 4321]

    resolved = fs.resolve_path(f"hf://{hub_repo_id}@refs%2Fpr%2F1/ckpt")
    assert (resolved.repo_id, resolved.revision, resolved.path_in_repo) == (hub_repo_id, "refs/pr/1", "ckpt")
    assert fs.cat_file(f"hf://{hub_repo_id}@refs%2Fpr%2F1/ckpt/pr.txt") == b"pr"
    resolved = fs.resolve_path(f"hf://{hub_repo_id}@exp/ckpt/inner")
    assert (resolved.revision, resolved.path_in_repo) == ("exp", "ckpt/inner")
    with pytest.raises(FileNotFoundError):
        fs.resolve_path(f"hf://{hub_repo_id}@no-such-branch/ckpt")


def test_range_requests_and_resumed_download(hub_api: HfApi, hub_repo_id: str, hub_server) -> None:
    hub_api.create_repo(hub_repo_id)
    data = os.urandom(10_000)
    hub_api.upload_file(path_or_fileobj=data, path_in_repo="blob.bin", repo_id=hub_repo_id)
    url = hf_hub_url(hub_repo_id, "blob.bin")

    def fetch(method: str = "GET", range_header: str | None = None):
        request = urllib.request.Request(url, method=method)
        if range_header:
            request.add_header("Range", range_header)
        return urllib.request.urlopen(request, timeout=30)

    with fetch() as r:
        assert r.status == 200 and r.headers["Content-Length"] == str(len(data)) and r.read() == data
    with fetch("HEAD") as r:
        assert r.headers["Content-Length"] == str(len(data)) and r.read() == b""
    with fetch(range_header="bytes=10-19") as r:
        assert r.status == 206 and r.read() == data[10:20]
        assert r.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    with fetch(range_header="bytes=9990-") as r:
        assert r.read() == data[9990:]
    with fetch(range_header="bytes=-7") as r:
        assert r.read() == data[-7:]
    with fetch(range_header="bytes=9995-20000") as r:
        assert r.read() == data[9995:]
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        fetch(range_header=f"bytes={len(data)}-")
    assert excinfo.value.code == 416
    assert excinfo.value.headers["Content-Range"] == f"bytes */{len(data)}"

    # The client's own resume path: continue a partial download with a Range request.
    partial = io.BytesIO(data[:4096])
    partial.seek(4096)
    http_get(url, partial, resume_size=4096, expected_size=len(data))
    assert partial.getvalue() == data


def test_delete_copy_and_folder_operations(hub_api: HfApi, hub_repo_id: str) -> None:
    hub_api.create_repo(hub_repo_id)
    weights = os.urandom(1000)
    hub_api.create_commit(
        hub_repo_id,
        [
            CommitOperationAdd("keep/a.txt", b"a"),
            CommitOperationAdd("keep/b.txt", b"b"),
            CommitOperationAdd("keep/w.safetensors", weights),
            CommitOperationAdd("old/x.txt", b"x"),
            CommitOperationAdd("old/deep/y.txt", b"y"),
        ],
        commit_message="init",
    )
    hub_api.create_commit(
        hub_repo_id,
        [
            CommitOperationDelete("keep/a.txt"),
            CommitOperationDelete("old/", is_folder=True),
            CommitOperationCopy(src_path_in_repo="keep/b.txt", path_in_repo="copy/b.txt"),
            CommitOperationCopy(src_path_in_repo="keep/w.safetensors", path_in_repo="copy/w.safetensors"),
        ],
        commit_message="reshape",
    )
    assert sorted(hub_api.list_repo_files(hub_repo_id)) == [
        ".gitattributes",
        "copy/b.txt",
        "copy/w.safetensors",
        "keep/b.txt",
        "keep/w.safetensors",
    ]
    assert read_bytes(hf_hub_download(hub_repo_id, "copy/b.txt")) == b"b"
    assert read_bytes(hf_hub_download(hub_repo_id, "copy/w.safetensors")) == weights
    hub_api.delete_folder("copy", repo_id=hub_repo_id)
    hub_api.delete_file("keep/b.txt", repo_id=hub_repo_id)
    assert sorted(hub_api.list_repo_files(hub_repo_id)) == [".gitattributes", "keep/w.safetensors"]


def test_delete_move_private_and_dataset_repos(hub_api: HfApi, hub_repo_id: str, hub_server) -> None:
    anonymous = HfApi(endpoint=hub_server.endpoint, token=False)
    hub_api.create_repo(hub_repo_id, private=True)
    hub_api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=hub_repo_id)
    assert hub_api.model_info(hub_repo_id).private is True
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info(hub_repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(hub_repo_id, "s.txt", token=False)
    hub_api.update_repo_settings(hub_repo_id, private=False)
    assert anonymous.model_info(hub_repo_id).private is False

    moved = hub_repo_id + "-moved"
    hub_api.move_repo(hub_repo_id, moved)
    assert read_bytes(hf_hub_download(moved, "s.txt")) == b"secret"
    assert not hub_api.repo_exists(hub_repo_id)
    hub_api.delete_repo(moved)
    with pytest.raises(RepositoryNotFoundError):
        hub_api.model_info(moved)
    with pytest.raises(RepositoryNotFoundError):
        hub_api.delete_repo(moved)
    hub_api.delete_repo(moved, missing_ok=True)

    hub_api.create_repo(hub_repo_id, repo_type="dataset")
    hub_api.upload_file(
        path_or_fileobj=b"rows", path_in_repo="data.csv", repo_id=hub_repo_id, repo_type="dataset"
    )
    assert read_bytes(hf_hub_download(hub_repo_id, "data.csv", repo_type="dataset")) == b"rows"
    assert hub_api.dataset_info(hub_repo_id).id == hub_repo_id
    assert (Path(snapshot_download(hub_repo_id, repo_type="dataset")) / "data.csv").read_bytes() == b"rows"
    with pytest.raises(RepositoryNotFoundError):
        hub_api.model_info(hub_repo_id)  # a dataset is not a model


def test_concurrent_commits_are_serialised(hub_api: HfApi, hub_repo_id: str) -> None:
    hub_api.create_repo(hub_repo_id)
    errors: list[BaseException] = []

    def push(i: int) -> None:
        try:
            hub_api.upload_file(
                path_or_fileobj=f"file {i}".encode(), path_in_repo=f"f{i}.txt", repo_id=hub_repo_id
            )
        except BaseException as err:  # collected and re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(hub_api.list_repo_files(hub_repo_id)) == sorted(
        [".gitattributes", *(f"f{i}.txt" for i in range(6))]
    )
    commits = hub_api.list_repo_commits(hub_repo_id)
    assert len(commits) == 7 and len({c.commit_id for c in commits}) == 7
    for i in range(6):
        assert read_bytes(hf_hub_download(hub_repo_id, f"f{i}.txt")) == f"file {i}".encode()


def test_tree_pagination_and_last_commits(hub_api: HfApi, hub_repo_id: str) -> None:
    hub_api.create_repo(hub_repo_id)
    n = 1005  # the Hub (and this server) returns at most 1000 entries per page
    first = hub_api.create_commit(
        hub_repo_id,
        [CommitOperationAdd(f"many/{i:04d}.txt", str(i).encode()) for i in range(n)],
        commit_message="many",
    )
    second = hub_api.upload_file(
        path_or_fileobj=b"changed", path_in_repo="many/0003.txt", repo_id=hub_repo_id
    )
    listed = [f.path for f in hub_api.list_repo_tree(hub_repo_id, "many")]
    assert listed == [f"many/{i:04d}.txt" for i in range(n)]
    assert (
        len(list(hub_api.list_repo_tree(hub_repo_id, recursive=True))) == n + 2
    )  # + folder + .gitattributes

    infos = {
        i.path: i
        for i in hub_api.get_paths_info(
            hub_repo_id, ["many/0003.txt", "many/0004.txt", "many", "nope"], expand=True
        )
    }
    assert set(infos) == {"many/0003.txt", "many/0004.txt", "many"}
    assert infos["many/0003.txt"].last_commit.oid == second.oid
    assert infos["many/0004.txt"].last_commit.oid == first.oid
    assert infos["many"].last_commit.oid == second.oid


def test_lfs_batch_and_chunked_upload_protocol(hub_api: HfApi, hub_repo_id: str, hub_server) -> None:
    """The git-lfs batch API and a ``Transfer-Encoding: chunked`` PUT, spoken with http.client."""
    hub_api.create_repo(hub_repo_id)
    data = os.urandom(70_000)
    oid = hashlib.sha256(data).hexdigest()
    endpoint = urlsplit(hub_server.endpoint)
    headers = {
        "Authorization": f"Bearer {hub_server.token}",
        "Content-Type": "application/vnd.git-lfs+json",
        "Accept": "application/vnd.git-lfs+json",
    }

    def batch() -> dict:
        conn = http.client.HTTPConnection(endpoint.hostname, endpoint.port, timeout=30)
        body = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(data)}]}
        conn.request("POST", f"/{hub_repo_id}.git/info/lfs/objects/batch", json.dumps(body), headers)
        response = conn.getresponse()
        assert response.status == 200
        return json.loads(response.read())["objects"][0]

    def put_chunked(href: str, payload: bytes) -> int:
        url = urlsplit(href)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        chunks = (payload[i : i + 7000] for i in range(0, len(payload), 7000))
        conn.request("PUT", f"{url.path}?{url.query}", body=chunks, encode_chunked=True)
        response = conn.getresponse()
        response.read()
        return response.status

    first = batch()
    href = first["actions"]["upload"]["href"]
    assert put_chunked(href, data[:-1] + b"\0") == 400  # content does not match the oid: refused
    assert "actions" in batch()  # ... and not stored
    assert put_chunked(href, data) == 200
    assert "actions" not in batch()  # now present upstream: nothing to upload
    # Received, then committed by the client: the repo serves exactly the uploaded bytes.
    hub_api.create_commit(
        hub_repo_id, [CommitOperationAdd("w.safetensors", data)], commit_message="lfs object already uploaded"
    )
    storage = HubStorage(hub_server.root)
    assert storage.read_blob(oid) == data
    assert read_bytes(hf_hub_download(hub_repo_id, "w.safetensors")) == data
