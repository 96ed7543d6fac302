"""Hub downloads fetch the manifest, then exactly the files it references (nothing else reaches the cache);
subfolders with glob characters are refused; an unreachable Hub is one clear error; every entry point takes the
same Hub keywords. Against the local Hub server over real HTTP (tests/conftest.py)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import constants

import hf_optim
from hf_optim import OPTIMIZER_INDEX_NAME, CheckpointError, push_state_to_hub
from hf_optim.cli import inspect_cmd
from hf_optim.hub import download_checkpoint, inspect_state, load_state, resolve_state_dir
from tests.hub_plugin import bind_listen_socket, client_env, endpoint_of

HUB_KEYWORDS = {
    "repo_type",
    "revision",
    "subfolder",
    "token",
    "cache_dir",
    "local_files_only",
    "force_download",
}


def setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = hf_optim.AdamW(model.named_parameters(), lr=1e-2)
    sched = hf_optim.get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=10)
    model(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _cached_files(repo_id: str) -> list[tuple[str, int]]:
    """(path relative to the repo's cache folder, size) of every cached file: snapshots and blobs."""
    folder = os.path.join(constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"))
    out = []
    for d, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(d, f)
            out.append((os.path.relpath(path, folder), os.path.getsize(path)))
    return out


@pytest.mark.parametrize("sharded", [False, True])
def test_only_referenced_files_are_downloaded(hub_api, hub_repo_id, sharded):
    _, opt, sched = setup()
    push_state_to_hub(hub_repo_id, opt, sched, subfolder="s", max_shard_size=300 if sharded else "5GB")
    big = os.urandom(2 << 20)
    # names a pattern-based download would take for state files: a stale shard and an unreferenced accumulator
    for name in ("s/optimizer-00007-of-00009.safetensors", "s/accumulator.safetensors", "s/notes.bin"):
        hub_api.upload_file(path_or_fileobj=big, path_in_repo=name, repo_id=hub_repo_id)
    listed = hub_api.list_repo_files(hub_repo_id)
    _, opt2, sched2 = setup()
    load_state(hub_repo_id, opt2, sched2, subfolder="s")
    cached = _cached_files(hub_repo_id)
    assert all(size < (2 << 20) for _, size in cached), cached
    snapshot_names = sorted(os.path.basename(p) for p, _ in cached if p.startswith("snapshots"))
    expected = sorted(
        os.path.basename(f)
        for f in listed
        if f.startswith("s/")
        and f not in ("s/optimizer-00007-of-00009.safetensors", "s/accumulator.safetensors")
        and not f.endswith("notes.bin")
    )
    assert snapshot_names == expected
    assert (OPTIMIZER_INDEX_NAME in snapshot_names) == sharded


def test_index_referencing_a_file_outside_the_folder_is_refused(hub_api, hub_repo_id, tmp_path):
    _, opt, sched = setup()
    push_state_to_hub(hub_repo_id, opt, sched, max_shard_size=300)
    with open(os.path.join(hf_optim.resolve_state_dir(hub_repo_id), OPTIMIZER_INDEX_NAME)) as f:
        index = json.load(f)
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../secret.safetensors"
    hub_api.upload_file(
        path_or_fileobj=json.dumps(index).encode(), path_in_repo=OPTIMIZER_INDEX_NAME, repo_id=hub_repo_id
    )
    hub_api.upload_file(
        path_or_fileobj=b"x" * 100, path_in_repo="../secret.safetensors".lstrip("./"), repo_id=hub_repo_id
    )
    _, opt2, sched2 = setup()
    before = opt2.state_dict()
    with pytest.raises(
        CheckpointError, match=rf"{OPTIMIZER_INDEX_NAME}: file name '\.\./secret\.safetensors'"
    ):
        load_state(hub_repo_id, opt2, sched2, force_download=True)
    assert opt2.state_dict()["state"].keys() == before["state"].keys()


@pytest.mark.parametrize("subfolder", ["s*", "a/b?", "[ab]", "x]"])
def test_glob_characters_in_subfolders_are_refused(hub_repo_id, subfolder):
    _, opt, _ = setup()
    calls = [
        lambda: load_state(hub_repo_id, opt, subfolder=subfolder),
        lambda: inspect_state(hub_repo_id, subfolder=subfolder),
        lambda: resolve_state_dir(hub_repo_id, subfolder=subfolder),
        lambda: download_checkpoint(hub_repo_id, subfolder=subfolder),
        lambda: push_state_to_hub(hub_repo_id, opt, subfolder=subfolder),
        lambda: load_state(f"hf://{hub_repo_id}/{subfolder}", opt),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="glob characters"):
            call()


def test_every_entry_point_takes_the_same_hub_keywords():
    for fn in (load_state, inspect_state, resolve_state_dir, download_checkpoint):
        assert set(inspect.signature(fn).parameters) >= HUB_KEYWORDS, fn.__name__
    # uploading takes where to (repo type, revision, subfolder, token), nothing that only concerns downloads
    push = set(inspect.signature(push_state_to_hub).parameters)
    download_only = {"cache_dir", "local_files_only", "force_download"}
    assert push >= HUB_KEYWORDS - download_only and not push & download_only
    # the Hub's load_state is the local one plus where to find the checkpoint: same names, kinds and defaults
    local = inspect.signature(hf_optim.state.load_state).parameters
    hub = inspect.signature(load_state).parameters
    for name, param in local.items():
        if name in ("directory", "roots"):
            continue
        assert name in hub and (hub[name].kind, hub[name].default) == (param.kind, param.default), name
    assert hf_optim.load_state is load_state and hf_optim.inspect_state is inspect_state
    parser = __import__("argparse").ArgumentParser()
    inspect_cmd.register(parser.add_subparsers())
    options = {a.dest for sub in parser._subparsers._group_actions[0].choices.values() for a in sub._actions}
    assert options >= HUB_KEYWORDS


def test_unreachable_hub_is_one_clear_error(tmp_path):
    """A closed port: the error names the endpoint tried and the offline alternatives, in Python and on the
    command line (one line, no traceback). Subprocesses: the endpoint is read when huggingface_hub is imported;
    both run at once, since huggingface_hub spends most of their time waiting between its retries."""
    sock = bind_listen_socket()
    dead = endpoint_of(sock)
    sock.close()
    code = textwrap.dedent(
        """
        import torch, hf_optim
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
        hf_optim.load_state("user/repo", opt)
        """
    )
    commands = {
        "python": [sys.executable, "-c", code],
        "cli": [sys.executable, "-m", "hf_optim.cli.main", "inspect", "user/repo"],
    }
    running = {
        name: subprocess.Popen(
            argv,
            env=client_env(dead, tmp_path / name),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, argv in commands.items()
    }
    try:
        done = {name: (proc, *proc.communicate(timeout=180)) for name, proc in running.items()}
    finally:
        for proc in running.values():
            proc.kill()  # a no-op for a process that ended; a hang is a failure, never left behind
    proc, _, stderr = done["python"]
    assert proc.returncode != 0, stderr[-2000:]
    assert f"the Hub at {dead} could not be reached" in stderr, stderr[-2000:]
    assert "HF_HUB_OFFLINE=1" in stderr and "hf-optim hub serve" in stderr and "HF_ENDPOINT" in stderr
    proc, _, stderr = done["cli"]
    # (huggingface_hub logs its retries as warnings before that)
    errors = [line for line in stderr.splitlines() if line.startswith("hf-optim inspect: error")]
    assert proc.returncode == 2 and len(errors) == 1 and dead in errors[0], stderr
    assert "Traceback" not in stderr


def test_local_files_only_uses_the_cache(hub_repo_id):
    _, opt, sched = setup()
    push_state_to_hub(hub_repo_id, opt, sched, revision="v1")
    _, opt2, sched2 = setup()
    with pytest.raises(FileNotFoundError, match="local_files_only=True"):
        load_state(hub_repo_id, opt2, sched2, revision="v1", local_files_only=True)
    load_state(hub_repo_id, opt2, sched2, revision="v1")
    _, opt3, sched3 = setup()
    report = load_state(hub_repo_id, opt3, sched3, revision="v1", local_files_only=True)
    assert report.complete


@pytest.mark.parametrize("where", ["repo", "revision"])
def test_missing_repository_or_revision_is_one_clear_error(hub_repo_id, where):
    """Not huggingface_hub's raw 404 about a manifest file the user never named: a CheckpointError naming the
    repository (and revision)."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    if where == "revision":
        push_state_to_hub(hub_repo_id, opt)
    revision = "no-such-branch" if where == "revision" else None
    with pytest.raises(CheckpointError) as info:
        load_state(hub_repo_id, opt, revision=revision)
    message = str(info.value)
    assert hub_repo_id in message and OPTIMIZER_INDEX_NAME not in message
    assert ("no-such-branch" in message) == (where == "revision")
