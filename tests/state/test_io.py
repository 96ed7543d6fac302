"""safetensors files: what hf_optim.state.io writes the safetensors library reads, and the other way round."""

from __future__ import annotations

import json
import os
import struct
import weakref

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from hf_optim.state.io import (
    open_file,
    read_safetensors,
    read_tensors,
    write_safetensors,
    write_safetensors_streaming,
)
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


def _all_dtypes() -> dict[str, torch.Tensor]:
    """One tensor of every dtype hf_optim stores, with names whose order differs from the dtype order."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 4, generator=g)
    return {
        "z.f32": base,
        "a.f64": base.double(),
        "m.f16": base.half(),
        "b.bf16": base.bfloat16(),
        "y.c64": torch.complex(base, -base),
        "c.i64": torch.arange(-5, 7, dtype=torch.int64),
        "x.i32": torch.arange(-5, 7, dtype=torch.int32),
        "d.i16": torch.arange(-5, 7, dtype=torch.int16),
        "w.i8": torch.arange(-5, 7, dtype=torch.int8),
        "e.u8": torch.arange(250, 256, dtype=torch.uint8),
        "v.u16": torch.tensor([1, 65535, 7], dtype=torch.uint16),
        "f.u32": torch.tensor([1, 2**32 - 1, 7], dtype=torch.uint32),
        "u.u64": torch.tensor([1, 2**63, 7], dtype=torch.uint64),
        "g.bool": torch.tensor([True, False, True]),
        "t.e4m3": base.to(torch.float8_e4m3fn),
        "h.e5m2": base.to(torch.float8_e5m2),
        "s.scalar": torch.tensor(2.5),
        "i.empty": torch.empty(0, 3),
        "r.empty_bf16": torch.empty(2, 0, dtype=torch.bfloat16),
        "B.upper": torch.ones(1),  # uppercase sorts before lowercase (byte order)
        "é.unicode": torch.ones(2),
        'q"quote\\back\nline\x01': torch.zeros(1),  # escaped in the JSON header
    }


CASES = {
    "all dtypes": (_all_dtypes(), {"format": "pt"}),
    "one tensor, header padded": ({"x": torch.ones(1)}, None),
    "long metadata": (
        {"w": torch.arange(10, dtype=torch.float32).reshape(2, 5)},
        {"hf_optim": json.dumps({"a": [1, 2.5, None], "b": "ü\u2028\x7f\t"}), "format": "pt"},
    ),
    "empty metadata": ({"a": torch.zeros(2, 2)}, {}),
    "no tensors": ({}, {"format": "pt"}),
    "no tensors, no metadata": ({}, None),
    "only empty tensors": ({"b": torch.empty(0), "a": torch.empty(0, 2, dtype=torch.float16)}, {"k": "v"}),
}


def _metadata_as_written(path: str) -> dict[str, str] | None:
    """The ``__metadata__`` of a file in the order its header lists it (safetensors writes a hash map's order)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__")


@pytest.mark.parametrize("case", sorted(CASES))
def test_streaming_writer_is_byte_identical_to_safetensors(tmp_path, case):
    tensors, metadata = CASES[case]
    reference = str(tmp_path / "reference.safetensors")
    safetensors.torch.save_file(tensors, reference, metadata=metadata)
    # safetensors writes __metadata__ in a hash map's (random) order; the writer keeps the order it is given
    metadata = _metadata_as_written(reference) if metadata is not None else None
    specs = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in tensors.items()}
    streamed = str(tmp_path / "streamed.safetensors")
    write_safetensors_streaming(streamed, specs, lambda key: tensors[key].clone(), metadata, fsync=True)
    with open(reference, "rb") as a, open(streamed, "rb") as b:
        assert a.read() == b.read()


def test_streaming_writer_holds_one_tensor_at_a_time(tmp_path):
    tensors = _all_dtypes()
    alive, most, calls = [0], [0], []

    def fill(key: str) -> torch.Tensor:
        calls.append(key)
        t = tensors[key].clone()
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(t, lambda: alive.__setitem__(0, alive[0] - 1))
        return t

    specs = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in tensors.items()}
    path = str(tmp_path / "x.safetensors")
    write_safetensors_streaming(path, specs, fill, {"format": "pt"}, fsync=False)
    assert sorted(calls) == sorted(tensors) and len(calls) == len(tensors)  # each built once
    assert most[0] == 1 and alive[0] == 0
    loaded = safetensors.torch.load_file(path)
    for k, t in tensors.items():
        assert_same_value(loaded[k], t, k)


def test_streaming_writer_takes_non_contiguous_tensors(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    path = str(tmp_path / "x.safetensors")
    spec = {"t": torch.empty(4, 3, device="meta")}
    write_safetensors_streaming(path, spec, lambda key: base.t(), None, fsync=False)
    assert torch.equal(safetensors.torch.load_file(path)["t"], base.t())


@pytest.mark.parametrize(
    ("made", "error", "match"),
    [
        (torch.zeros(2, 3, dtype=torch.float64), ValueError, "float64"),
        (torch.zeros(3, 2), ValueError, "shape"),
        ([0.0] * 6, TypeError, "list"),
    ],
)
def test_streaming_writer_refuses_a_tensor_unlike_its_spec(tmp_path, made, error, match):
    with pytest.raises(error, match=match):
        write_safetensors_streaming(
            str(tmp_path / "x.safetensors"),
            {"t": torch.empty(2, 3, device="meta")},
            lambda key: made,
            None,
            fsync=False,
        )


def test_streaming_writer_refuses_unsupported_dtypes(tmp_path):
    with pytest.raises(TypeError, match="complex128"):
        write_safetensors_streaming(
            str(tmp_path / "x.safetensors"),
            {"t": torch.empty(2, dtype=torch.complex128, device="meta")},
            lambda key: torch.zeros(2, dtype=torch.complex128),
            None,
            fsync=False,
        )
