"""Adversarial review of ``hf-optim convert``: a hostile pickled optimizer.pt (tensors and plain containers
only, so torch.load(weights_only=True) accepts it) must give one error line naming the file, no traceback and
nothing written (README "Security": "a malformed file is one error line")."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def _convert(directory):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "hf_optim.cli.main", "convert", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _nested(depth):
    out = cur = []
    for _ in range(depth):
        cur.append([])
        cur = cur[0]
    return out


def _save_deep(path, depth):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * depth + 1000))  # torch.save pickles recursively
    try:
        torch.save({"state": {}, "param_groups": [{"params": [0], "lr": 0.1, "x": _nested(depth)}]}, path)
    finally:
        sys.setrecursionlimit(limit)


def _assert_one_error_line(directory, path):
    result = _convert(directory)
    assert "Traceback" not in result.stderr, result.stderr[-800:]
    assert result.returncode == 2, result.stderr[-800:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0], lines[0]
    assert sorted(os.listdir(directory)) == ["optimizer.pt"]


def test_deeply_nested_hyperparameter_is_one_error_line(tmp_path):
    path = tmp_path / "optimizer.pt"
    _save_deep(path, 3000)
    _assert_one_error_line(tmp_path, path)


def test_convert_never_writes_a_checkpoint_hf_optim_cannot_read(tmp_path):
    """A hyperparameter nested 100 deep converts 'successfully' into optimizer.safetensors that load_state /
    inspect_state reject ("JSON nested too deeply"). Convert must refuse instead."""
    path = tmp_path / "optimizer.pt"
    _save_deep(path, 100)
    _assert_one_error_line(tmp_path, path)


@pytest.mark.parametrize(
    "state_dict",
    [
        {"state": {0: {5: torch.tensor(1.0)}}, "param_groups": [{"params": [0], "lr": 0.1}]},
        {"state": {}, "param_groups": [{"params": [0], "lr": 0.1, "state": 1}]},
        {"state": {}, "param_groups": [{"params": [0], "lr": 0.1}], "param_names": 3},
        {"state": {0: {"exp_avg": {1, 2}}}, "param_groups": [{"params": [0], "lr": 0.1}]},
    ],
    ids=["int-state-key", "reserved-group-key", "reserved-top-level-key", "set-value"],
)
def test_rejected_structure_names_the_file(tmp_path, state_dict):
    path = tmp_path / "optimizer.pt"
    torch.save(state_dict, path)
    _assert_one_error_line(tmp_path, path)


def test_names_from_model_dir_only_builds_model_classes(tmp_path):
    """``--names-from DIR`` (the README suggests the checkpoint folder itself): ``config.json`` names
    ``architectures[0] = "is_torch_available"``, which convert calls with the config: a TypeError traceback. Only
    model classes may be built; anything else is one error line naming config.json."""
    import json

    pytest.importorskip("transformers")
    path = tmp_path / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [{"params": [0, 1], "lr": 0.1}]}, path)
    config = {
        "model_type": "bert",
        "architectures": ["is_torch_available"],
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 8,
        "vocab_size": 10,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-m", "hf_optim.cli.main", "convert", str(tmp_path), "--names-from", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert "Traceback" not in result.stderr, result.stderr[-800:]
    assert result.returncode == 2 and "config.json" in result.stderr, result.stderr[-800:]
