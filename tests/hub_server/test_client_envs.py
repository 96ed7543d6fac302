"""Clients with another environment than the test process (xet enabled, offline), the CLI, persistence.

huggingface_hub reads HF_ENDPOINT / HF_HUB_DISABLE_XET / HF_HUB_OFFLINE at import, so those clients run in a
subprocess (``run_python``) with their own ``HF_HOME``. Expected values are sha256 digests of the bytes the
test wrote, computed here with hashlib.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from huggingface_hub import HfApi, hf_hub_download

from hf_optim.cli.main import main as cli_main
from hf_optim.hub_server import HubStorage, serve
from tests.hub_plugin import TEST_TOKEN, client_env, run_python

# Runs in the client subprocess: print {path in repo: sha256} of what hf_hub_download / snapshot_download return.
_DIGESTS = """
import hashlib, json
from pathlib import Path

def digests(folder):
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts}

def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
"""


def last_json(stdout: str) -> dict:
    """The JSON object the client printed last (anything else on stdout is ignored)."""
    return json.loads(stdout.strip().splitlines()[-1])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


def test_xet_enabled_client_with_every_file_regular(tmp_path: Path) -> None:
    """Default server (no --lfs-extensions): a client with xet on uploads and downloads everything."""
    folder = tmp_path / "ckpt"
    files = {
        "optimizer.safetensors": os.urandom(40_000),
        "scheduler.json": b'{"last_epoch": 3}',
        "sub/x.bin": b"x",
    }
    write_files(folder, files)
    code = _DIGESTS + textwrap.dedent(
        """
        import sys
        from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
        from huggingface_hub.utils._runtime import is_xet_available

        folder, repo = sys.argv[1], "local-user/xet-on"
        assert not constants.HF_HUB_DISABLE_XET and is_xet_available(), "xet must be enabled in this client"
        api = HfApi()
        api.create_repo(repo)
        api.upload_file(path_or_fileobj=folder + "/optimizer.safetensors", path_in_repo="single.safetensors",
                        repo_id=repo)
        api.upload_folder(folder_path=folder, repo_id=repo, path_in_repo="ckpt")  # xet's pipelined upload
        pr = api.upload_folder(folder_path=folder, repo_id=repo, path_in_repo="pr", create_pr=True)
        tree = [f for f in api.list_repo_tree(repo, recursive=True) if hasattr(f, "lfs")]
        print(json.dumps({
            "single": sha(hf_hub_download(repo, "single.safetensors")),
            "snapshot": digests(snapshot_download(repo)),
            "pr_revision": pr.pr_revision,
            "pr_files": sorted(api.list_repo_files(repo, revision=pr.pr_revision)),
            "any_lfs": any(f.lfs is not None for f in tree),
        }))
        """
    )
    with serve(tmp_path / "hub", fsync=False) as server:
        env = client_env(server.url, tmp_path / "hf_home", xet=True)
        out = last_json(run_python(code, env, str(folder)))
        storage = server.storage
        head = storage.resolve(storage.get_repo("model", "local-user/xet-on"), "main")
        stored = storage.load_commit("model", "local-user/xet-on", head).files

    assert out["single"] == sha256(files["optimizer.safetensors"])
    expected = {f"ckpt/{rel}": sha256(data) for rel, data in files.items()}
    expected["single.safetensors"] = sha256(files["optimizer.safetensors"])
    assert {k: v for k, v in out["snapshot"].items() if k != ".gitattributes"} == expected
    assert out["pr_revision"] == "refs/pr/1"
    assert [p for p in out["pr_files"] if p.startswith("pr/")] == sorted(f"pr/{rel}" for rel in files)
    assert out["any_lfs"] is False
    assert not any(entry.lfs for entry in stored.values())


def test_offline_mode_serves_from_cache_after_server_stopped(
    spawn_hub_server_factory, tmp_path: Path
) -> None:
    weights, config = os.urandom(30_000), b'{"lr": 0.001}'
    hf_home = tmp_path / "hf_home"
    online = _DIGESTS + textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download

        repo = "local-user/offline"
        api = HfApi()
        api.create_repo(repo)
        api.upload_file(path_or_fileobj=Path(sys.argv[1]).read_bytes(), path_in_repo="state/optimizer.safetensors",
                        repo_id=repo)
        api.upload_file(path_or_fileobj=Path(sys.argv[2]).read_bytes(), path_in_repo="state/config.json", repo_id=repo)
        api.upload_file(path_or_fileobj=b"never downloaded", path_in_repo="other.txt", repo_id=repo)
        snapshot_download(repo, allow_patterns=["state/*"])
        print(json.dumps({"file": sha(hf_hub_download(repo, "state/config.json"))}))
        """
    )
    offline = _DIGESTS + textwrap.dedent(
        """
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        import sys

        repo = "local-user/offline"
        out = {"file": sha(hf_hub_download(repo, "state/optimizer.safetensors")),
               "snapshot": digests(snapshot_download(repo, allow_patterns=["state/*"]))}
        if sys.argv[1] == "check-miss":  # offline: a file that was never downloaded is not there
            try:
                hf_hub_download(repo, "other.txt")
                out["miss"] = "downloaded"
            except LocalEntryNotFoundError:
                out["miss"] = "LocalEntryNotFoundError"
        print(json.dumps(out))
        """
    )
    (tmp_path / "w").write_bytes(weights)
    (tmp_path / "c").write_bytes(config)
    with spawn_hub_server_factory(lfs_extensions=(".safetensors",)) as hub:
        endpoint = hub.endpoint
        got = last_json(
            run_python(online, client_env(endpoint, hf_home), str(tmp_path / "w"), str(tmp_path / "c"))
        )
        assert got["file"] == sha256(config)
    assert hub.process.returncode == 0  # stopped by SIGTERM, cleanly

    url = urlsplit(endpoint)
    with pytest.raises(ConnectionRefusedError), socket.create_connection((url.hostname, url.port), timeout=5):
        pass  # the server is really gone

    expected = {
        "file": sha256(weights),
        "snapshot": {"state/optimizer.safetensors": sha256(weights), "state/config.json": sha256(config)},
        "miss": "LocalEntryNotFoundError",
    }
    assert (
        last_json(run_python(offline, client_env(endpoint, hf_home, offline=True), "check-miss")) == expected
    )
    # Without HF_HUB_OFFLINE the client finds the server unreachable and falls back to the same cache.
    # (Not for the missing file: the client then retries the connection for about a minute.)
    del expected["miss"]
    assert last_json(run_python(offline, client_env(endpoint, hf_home), "no-miss")) == expected


def test_cli_serve_and_storage_persists_across_servers(spawn_hub_server_factory, tmp_path: Path) -> None:
    root = tmp_path / "hub"
    data = os.urandom(5000)
    with spawn_hub_server_factory(root, cli=True, fsync=True) as hub:  # `hf-optim hub serve`
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        api.create_repo("local-user/persist")
        info = api.upload_file(path_or_fileobj=data, path_in_repo="d.bin", repo_id="local-user/persist")
        api.create_branch("local-user/persist", branch="keep")
    assert hub.process.returncode == 0

    # Another server (in a thread this time) on the same root sees the same commits and refs.
    with serve(root) as server:
        api = HfApi(endpoint=server.url, token=TEST_TOKEN)
        assert api.model_info("local-user/persist").sha == info.oid
        assert {b.name: b.target_commit for b in api.list_repo_refs("local-user/persist").branches} == {
            "main": info.oid,
            "keep": info.oid,
        }
        path = hf_hub_download(
            "local-user/persist", "d.bin", revision="keep", endpoint=server.url, cache_dir=tmp_path / "cache"
        )
        assert Path(path).read_bytes() == data


def test_cli_rejects_bad_arguments_with_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert cli_main(["hub", "serve", "--root", str(a_file)]) == 2
    assert "--root" in capsys.readouterr().err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a hub")
    assert cli_main(["hub", "serve", "--root", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "--root" in err and "notes.txt" in err
    assert not (foreign / "hf-optim-hub.json").exists()  # refused without writing anything

    assert cli_main(["hub", "serve", "--root", str(tmp_path / "new"), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert cli_main(["hub", "serve", "--root", str(tmp_path / "new"), "--user", "two words"]) == 2
    assert "--user" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_token_option_restricts_writes(tmp_path: Path) -> None:
    with serve(tmp_path / "hub", token="the-only-token", fsync=False) as server:
        HfApi(endpoint=server.url, token="the-only-token").create_repo("local-user/guarded")
        from huggingface_hub.errors import HfHubHTTPError

        with pytest.raises(HfHubHTTPError) as excinfo:
            HfApi(endpoint=server.url, token="another-token").create_repo("local-user/other")
        assert excinfo.value.response.status_code == 401
        assert "Invalid credentials" in str(excinfo.value)
        assert HubStorage(server.root).list_repos("model")[0]["id"] == "local-user/guarded"
