"""Reading safetensors one tensor at a time with plain reads (format/safetensors_file.py): every dtype reads back
as safetensors wrote it, and a hostile header (lengths, offsets, dtypes, shapes) is one line, never a crash or a
read outside the file."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.format.safetensors_file import read_header, read_tensor


def test_every_dtype_reads_back(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
               "f16": torch.randn(2, 2, 2, generator=g).half(), "i32": torch.randint(-9, 9, (4,), generator=g,
                                                                                   dtype=torch.int32),
               "u8": torch.randint(0, 255, (6,), generator=g, dtype=torch.uint8), "empty": torch.zeros(0, 4),
               "scalar": torch.tensor(2.5), "bool": torch.tensor([True, False, True])}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"k": "v"})
    header = read_header(tmp_path / "a.safetensors")
    assert set(header) == set(tensors)
    with open(tmp_path / "a.safetensors", "rb") as f:
        for name, t in tensors.items():
            got = read_tensor(f, header[name])
            assert got.dtype == t.dtype and torch.equal(got, t), name
    other = dict(tensors, f32=tensors["f32"] + 1)              # negative control: another value is seen
    assert not torch.equal(other["f32"], read_tensor(open(tmp_path / "a.safetensors", "rb"), header["f32"]))


def _file(tmp_path, header: dict, data: bytes = b"\0" * 64, length=None) -> object:
    raw = json.dumps(header).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.mark.parametrize("header,length,needle", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 10**12, "exceeds the file"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 3, "not a safetensors file"),
    ({"a": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}, None, "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, None, "non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, None, "do not hold shape"),
    ({"a": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}, None, "do not hold shape"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [60, 76]}}, None, "do not hold shape"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, None, "do not hold shape"),
    ({"a": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, None, "non-negative integers"),
    ({"a": "x"}, None, "malformed header entry"),
])
def test_hostile_headers_are_one_line(tmp_path, header, length, needle):
    with pytest.raises(LowbitError) as e:
        read_header(_file(tmp_path, header, length=length))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_header_that_is_not_an_object(tmp_path):
    path = tmp_path / "h.safetensors"
    raw = b"[1, 2]"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(LowbitError, match="not a JSON object"):
        read_header(path)


def test_the_shard_writer_writes_what_safetensors_writes(tmp_path):
    """format/shards.write_safetensors (each tensor written from its own memory) against save_file, byte for
    byte, over every dtype an artifact holds and names that sort differently than their dtypes."""
    from lowbit.format.shards import write_safetensors

    g = torch.Generator().manual_seed(1)
    tensors = {"z.qweight": torch.randint(-2**31, 2**31 - 1, (5, 3), generator=g, dtype=torch.int32),
               "a.scales": torch.randn(4, 2, generator=g).bfloat16(), "m.bias": torch.randn(3, generator=g).half(),
               "b.norm": torch.randn(6, generator=g), "c.codes": torch.randint(0, 255, (7,), generator=g,
                                                                              dtype=torch.uint8),
               "pos": torch.arange(5), "q8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
               "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 3), "scalar": torch.tensor(1.5),
               "d64": torch.randn(2, generator=g, dtype=torch.float64)}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "lowbit.graph"})
    write_safetensors(tmp_path / "mine.safetensors", tensors, {"format": "lowbit.graph"})
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    tensors["b.norm"] = tensors["b.norm"] + 1                   # negative control
    write_safetensors(tmp_path / "other.safetensors", tensors, {"format": "lowbit.graph"})
    assert (tmp_path / "other.safetensors").read_bytes() != (tmp_path / "ref.safetensors").read_bytes()
