"""safetensors files: what hf_optim.state.io writes the safetensors library reads, and the other way round."""

from __future__ import annotations

import os

import safetensors.torch
from safetensors import safe_open

from hf_optim.state.io import open_file, read_safetensors, read_tensors, write_safetensors
from tests.state.helpers import (
    assert_same_value,
    sample_tensors,
)


def test_writer_output_is_read_by_safetensors(tmp_path):
    tensors = sample_tensors()
    path = str(tmp_path / "x.safetensors")
    write_safetensors(path, tensors, {"format": "pt", "k": "v ü"}, fsync=True)
    loaded = safetensors.torch.load_file(path)
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert_same_value(loaded[k].contiguous(), t.contiguous(), k)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v ü"}
    assert os.path.getsize(path) % 8 == (8 + sum(t.numel() * t.element_size() for t in tensors.values())) % 8


def test_reader_reads_files_written_by_safetensors(tmp_path):
    tensors = {k: v.contiguous() for k, v in sample_tensors().items()}
    path = str(tmp_path / "y.safetensors")
    safetensors.torch.save_file(tensors, path, metadata={"a": "b"})
    f = open_file(path, roots=[str(tmp_path)])
    st = read_safetensors(f)
    assert st.metadata == {"a": "b"}
    loaded = read_tensors(st, st.entries)
    f.close()
    for k, t in tensors.items():
        assert_same_value(loaded[k], t, k)
