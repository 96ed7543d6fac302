"""push_state_to_hub / load_state from the Hub, through the local Hub server over real HTTP.

References: the pushed optimizer's own ``state_dict()``, the repository's file list and commit history as the
server reports them through ``huggingface_hub.HfApi``.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hf_optim
from hf_optim import (
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    SCHEDULER_NAME,
    CheckpointError,
    load_state,
    push_state_to_hub,
)
from hf_optim.hub import download_checkpoint, parse_hf_url, resolve_state_dir
from tests.hub_plugin import bind_listen_socket, client_env, endpoint_of, run_python, start_python


def setup(hidden: int = 8, steps: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Linear(hidden, 2))
    opt = hf_optim.AdamW(model.named_parameters(), lr=1e-2)
    sched = hf_optim.get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=10)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(5, 4, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def assert_same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_push_then_load(hub_api, hub_repo_id):
    _, opt, sched = setup()
    info = push_state_to_hub(hub_repo_id, opt, sched, commit_message="state at step 3")
    files = hub_api.list_repo_files(hub_repo_id)
    assert {OPTIMIZER_NAME, SCHEDULER_NAME} <= set(files)
    commits = hub_api.list_repo_commits(hub_repo_id)
    assert commits[0].title == "state at step 3" and commits[0].commit_id == info.oid
    assert len(commits) == 2  # repo creation + exactly one commit for the state

    _, opt2, sched2 = setup(steps=0)
    report = load_state(hub_repo_id, opt2, sched2)
    assert report.complete and report.scheduler_loaded
    assert_same(opt2.state_dict(), opt.state_dict())
    assert_same(sched2.state_dict(), sched.state_dict())
    # downloaded into the normal HF cache
    assert os.path.realpath(report.source).startswith(os.path.realpath(os.environ["HF_HOME"]))


def test_revision_and_subfolder(hub_api, hub_repo_id):
    _, opt, sched = setup()
    push_state_to_hub(hub_repo_id, opt, sched, revision="run-1", subfolder="checkpoints/step-3")
    assert "run-1" in [b.name for b in hub_api.list_repo_refs(hub_repo_id).branches]
    assert not [f for f in hub_api.list_repo_files(hub_repo_id) if "step-3" in f]  # main untouched
    files = hub_api.list_repo_files(hub_repo_id, revision="run-1")
    assert f"checkpoints/step-3/{OPTIMIZER_NAME}" in files

    _, opt2, sched2 = setup(steps=0)
    load_state(hub_repo_id, opt2, sched2, revision="run-1", subfolder="checkpoints/step-3")
    assert_same(opt2.state_dict(), opt.state_dict())

    _, opt3, sched3 = setup(steps=0)
    load_state(f"hf://{hub_repo_id}@run-1/checkpoints/step-3", opt3, sched3)
    assert_same(opt3.state_dict(), opt.state_dict())

    before = copy.deepcopy(opt2.state_dict())
    with pytest.raises(FileNotFoundError, match=r"no optimizer state in subfolder 'checkpoints/step-3'"):
        load_state(hub_repo_id, opt2, sched2, subfolder="checkpoints/step-3")  # main has no such state
    assert_same(opt2.state_dict(), before)


def test_second_push_removes_stale_shards_in_one_commit(hub_api, hub_repo_id):
    _, opt, sched = setup(hidden=64)
    push_state_to_hub(hub_repo_id, opt, sched, max_shard_size=1000)
    shards = [f for f in hub_api.list_repo_files(hub_repo_id) if f.startswith("optimizer-")]
    assert len(shards) >= 3 and OPTIMIZER_INDEX_NAME in hub_api.list_repo_files(hub_repo_id)

    _, opt, sched = setup(hidden=64, steps=4)
    push_state_to_hub(hub_repo_id, opt, sched)  # fits in one file now
    files = hub_api.list_repo_files(hub_repo_id)
    assert OPTIMIZER_NAME in files and OPTIMIZER_INDEX_NAME not in files
    assert not [f for f in files if f.startswith("optimizer-")]
    assert len(hub_api.list_repo_commits(hub_repo_id)) == 3
    _, opt2, sched2 = setup(hidden=64, steps=0)
    load_state(hub_repo_id, opt2, sched2)
    assert_same(opt2.state_dict(), opt.state_dict())


def test_create_pr(hub_api, hub_repo_id):
    _, opt, sched = setup()
    push_state_to_hub(hub_repo_id, opt, sched)
    _, opt_b, sched_b = setup(steps=5)
    info = push_state_to_hub(hub_repo_id, opt_b, sched_b, create_pr=True)
    assert info.pr_num is not None
    _, opt2, sched2 = setup(steps=0)
    load_state(hub_repo_id, opt2, sched2)  # main still has the first state
    assert_same(opt2.state_dict(), opt.state_dict())
    load_state(hub_repo_id, opt2, sched2, revision=f"refs/pr/{info.pr_num}")
    assert_same(opt2.state_dict(), opt_b.state_dict())


def test_private_repo(hub_api, hub_repo_id):
    _, opt, _ = setup()
    push_state_to_hub(hub_repo_id, opt, private=True)
    assert hub_api.repo_info(hub_repo_id).private is True


def test_missing_repo_revision_and_file(hub_api, hub_repo_id):
    _, opt, sched = setup()
    before = (copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()))
    with pytest.raises(CheckpointError, match=f"{hub_repo_id}.*no such repository"):
        load_state(hub_repo_id, opt, sched)
    hub_api.create_repo(hub_repo_id)
    with pytest.raises(FileNotFoundError, match=rf"{hub_repo_id} \(revision main\) has no optimizer state"):
        load_state(hub_repo_id, opt, sched)
    with pytest.raises(CheckpointError, match="no revision 'no-such-branch'"):
        load_state(hub_repo_id, opt, sched, revision="no-such-branch")
    assert_same(opt.state_dict(), before[0])
    assert_same(sched.state_dict(), before[1])


def test_conflicting_url_and_arguments(hub_repo_id):
    _, opt, _ = setup()
    with pytest.raises(ValueError, match="revision='b' conflicts with 'a'"):
        load_state(f"hf://{hub_repo_id}@a", opt, revision="b")
    with pytest.raises(ValueError, match="subfolder"):
        load_state(hub_repo_id, opt, subfolder="../up")


def test_push_to_an_hf_url_and_invalid_repo_ids(hub_api, hub_repo_id):
    _, opt, sched = setup()
    push_state_to_hub(f"hf://{hub_repo_id}@exp/runs/a", opt, sched)
    assert f"runs/a/{OPTIMIZER_NAME}" in hub_api.list_repo_files(hub_repo_id, revision="exp")
    _, opt2, sched2 = setup(steps=0)
    load_state(hub_repo_id, opt2, sched2, revision="exp", subfolder="runs/a")
    assert_same(opt2.state_dict(), opt.state_dict())
    with pytest.raises(ValueError, match="subfolder='b' conflicts with 'runs/a'"):
        push_state_to_hub(f"hf://{hub_repo_id}/runs/a", opt, subfolder="b")
    for call in (lambda: push_state_to_hub("not a repo", opt), lambda: download_checkpoint("not a repo")):
        with pytest.raises(ValueError, match="'not a repo' is not a valid Hub repo id"):
            call()


def test_parse_hf_url():
    assert parse_hf_url("hf://user/repo") == hf_optim.HfUrl("model", "user/repo", None, None)
    assert parse_hf_url("hf://user/repo@v2/a/b") == hf_optim.HfUrl("model", "user/repo", "v2", "a/b")
    assert parse_hf_url("hf://datasets/user/ds@refs/pr/3/ckpt") == hf_optim.HfUrl(
        "dataset", "user/ds", "refs/pr/3", "ckpt"
    )
    assert parse_hf_url("hf://user/repo@refs%2Fheads%2Fx/sub").revision == "refs/heads/x"
    with pytest.raises(ValueError, match="invalid hf:// URL"):
        parse_hf_url("hf://only-one-part")
    with pytest.raises(ValueError, match="bucket"):
        parse_hf_url("hf://buckets/user/b/x")


def test_offline_or_unreachable_uses_the_cache(hub_server, hub_repo_id, tmp_path):
    """A client with HF_HUB_OFFLINE=1 and an unreachable endpoint loads what an online client downloaded; so does
    a client whose Hub refuses connections, at once (one warning, none of huggingface_hub's retries)."""
    _, opt, sched = setup()
    push_state_to_hub(hub_repo_id, opt, sched, revision="v1", subfolder="s")
    hf_optim.save_state(tmp_path / "expected", opt, sched)
    hf_home = tmp_path / "client_home"
    code = textwrap.dedent(
        f"""
        import torch, hf_optim
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        opt = hf_optim.AdamW(model.named_parameters(), lr=1e-2)
        sched = hf_optim.get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=10)
        hf_optim.load_state({hub_repo_id!r}, opt, sched, revision="v1", subfolder="s")
        ref_opt = hf_optim.AdamW(model.named_parameters(), lr=1e-2)
        ref_sched = hf_optim.get_scheduler("linear", ref_opt, num_warmup_steps=1, num_training_steps=10)
        hf_optim.load_state({str(tmp_path / "expected")!r}, ref_opt, ref_sched)
        a, b = opt.state_dict(), ref_opt.state_dict()
        assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in b["state"] for k in b["state"][i])
        assert a["param_groups"] == b["param_groups"] and sched.state_dict() == ref_sched.state_dict()
        print("ok")
        """
    )
    assert run_python(code, client_env(hub_server.endpoint, hf_home)).strip() == "ok"
    sock = bind_listen_socket()  # a port nobody answers on (listening socket, never accepted)
    try:
        dead = endpoint_of(sock)
        assert run_python(code, client_env(dead, hf_home, offline=True)).strip() == "ok"
        # offline with an empty cache: a clear error, not a hang
        with pytest.raises(
            AssertionError,
            match=rf"LocalEntryNotFoundError: the optimizer state of {hub_repo_id} "
            r"\(revision v1, subfolder 's'\) is not in the local cache",
        ):
            run_python(code, client_env(dead, tmp_path / "empty_home", offline=True), timeout=120)
    finally:
        sock.close()
    sock = bind_listen_socket()
    closed = endpoint_of(sock)
    sock.close()  # nothing listens there any more: connections are refused
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=client_env(closed, hf_home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.strip() == "ok", result.stderr
    warning = f"the Hub at {closed} could not be reached"
    assert warning in result.stderr and f"loading {hub_repo_id} (revision v1" in result.stderr, result.stderr
    assert "Retrying in" not in result.stderr, result.stderr  # huggingface_hub's log line for each retry


def test_download_checkpoint_at_the_root_is_served_from_the_cache_offline(
    hub_server, hub_api, hub_repo_id, tmp_path
):
    """The root's files and optimizer_N/ folders, not checkpoint-*/, online and then from the cache alone, both
    with HF_HUB_OFFLINE=1 and with the Hub unreachable."""
    _, opt, sched = setup()
    hub_api.create_repo(hub_repo_id)
    hub_api.upload_file(path_or_fileobj=b"top", path_in_repo="top.txt", repo_id=hub_repo_id)
    hub_api.upload_file(path_or_fileobj=b"x", path_in_repo="checkpoint-1/x.txt", repo_id=hub_repo_id)
    push_state_to_hub(hub_repo_id, opt, sched)
    push_state_to_hub(hub_repo_id, opt, subfolder="optimizer_1")
    expected = sorted(
        f for f in hub_api.list_repo_files(hub_repo_id) if "/" not in f or f.startswith("optimizer_1/")
    )
    assert {"top.txt", SCHEDULER_NAME, f"optimizer_1/{OPTIMIZER_NAME}"} <= set(expected)
    code = textwrap.dedent(
        f"""
        import os
        from hf_optim.hub import download_checkpoint
        directory = download_checkpoint({hub_repo_id!r})
        print(sorted(os.path.relpath(os.path.join(d, f), directory) for d, _, fs in os.walk(directory) for f in fs))
        """
    )
    hf_home = tmp_path / "client_home"
    assert run_python(code, client_env(hub_server.endpoint, hf_home)).strip() == str(expected)
    sock = bind_listen_socket()
    dead = endpoint_of(sock)
    sock.close()  # nothing listens there any more: connections are refused
    # with an empty cache, online: huggingface_hub retries for half a minute (waiting), beside the other runs
    empty = {
        offline: start_python(code, client_env(dead, tmp_path / "empty_home", offline=offline), timeout=120)
        for offline in (False, True)
    }
    for offline in (True, False):
        assert run_python(code, client_env(dead, hf_home, offline=offline)).strip() == str(expected)
        with pytest.raises(
            AssertionError,
            match=rf"LocalEntryNotFoundError: the checkpoint of {hub_repo_id} \(revision main\) is not in the "
            "local cache",
        ):
            empty[offline]()


def test_load_state_fetches_only_state_files_and_download_checkpoint_the_folder(hub_api, hub_repo_id):
    _, opt, sched = setup()
    hub_api.create_repo(hub_repo_id)
    for path in ("s/model.safetensors", "s/extra/notes.txt", "top.txt", "other/model.safetensors"):
        hub_api.upload_file(path_or_fileobj=path.encode() * 100, path_in_repo=path, repo_id=hub_repo_id)
    push_state_to_hub(hub_repo_id, opt, sched, subfolder="s")
    state_dir = resolve_state_dir(hub_repo_id, subfolder="s")
    assert sorted(os.listdir(state_dir)) == [OPTIMIZER_NAME, SCHEDULER_NAME]

    directory = download_checkpoint(f"hf://{hub_repo_id}/s")
    files = sorted(
        os.path.relpath(os.path.join(d, f), directory) for d, _, fs in os.walk(directory) for f in fs
    )
    assert files == ["extra/notes.txt", "model.safetensors", OPTIMIZER_NAME, SCHEDULER_NAME]
    with open(os.path.join(directory, "extra", "notes.txt"), "rb") as f:
        assert f.read() == b"s/extra/notes.txt" * 100

    root = download_checkpoint(hub_repo_id)  # the root's own files, not its folders
    assert os.path.isfile(os.path.join(root, "top.txt"))
    assert not os.path.exists(os.path.join(root, "other"))
    with pytest.raises(FileNotFoundError, match="has no folder 'nope'"):
        download_checkpoint(hub_repo_id, subfolder="nope")
