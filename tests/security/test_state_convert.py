"""``hf-optim convert`` of hostile pickled files: one clear error line naming the file, nothing written, no
traceback, no code run (checked in a subprocess through the command line)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch


def _convert(directory):
    return subprocess.run(
        [sys.executable, "-m", "hf_optim.cli.main", "convert", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
    )


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.write_bytes(b"\x80\x04garbage"),
        lambda p: p.write_bytes(pickle.dumps(_Boom())),
        lambda p: torch.save({"state": {0: {"exp_avg": 1}}, "param_groups": [{"params": "x"}]}, p),
        lambda p: torch.save({"state": {5: {}}, "param_groups": [{"params": [0]}]}, p),
        lambda p: torch.save({"state": {}, "param_groups": [{"params": [0, 0]}]}, p),
        lambda p: torch.save([1, 2, 3], p),
    ],
    ids=["garbage-pickle", "code", "params-str", "orphan-state", "repeated-index", "list"],
)
def test_malformed_optimizer_pt_is_one_error_line(tmp_path, make):
    path = tmp_path / "optimizer.pt"
    make(path)
    result = _convert(tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(path) in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["optimizer.pt"]
    assert not os.path.exists("PWNED")
