"""The int4pack layouts the CPU kernels' prefill path unpacks, checked on every CPU: torch packs in a layout that
depends on the instruction set (AVX2 or AVX-512), so each is written here from its definition and unpacked."""

import pytest
import torch

from lowbit.kernels import cpu


def _pack(q: torch.Tensor, layout) -> torch.Tensor:
    """``q`` [rows, k] (codes 0..15) packed as ``layout`` defines: byte (block, k // run, k % run, i) holds row i's
    code low and row block/2 + i's high."""
    block, run = layout
    rows, k = q.shape
    half = block // 2
    b = q.to(torch.uint8).view(rows // block, 2, half, k // run, run)
    low, high = b[:, 0], b[:, 1]                                   # [blocks, half, k/run, run]
    return (low | (high << 4)).permute(0, 2, 3, 1).contiguous().view(-1)


@pytest.mark.parametrize("layout", cpu.INT4PACK_LAYOUTS)
def test_unpack_reads_each_layout(layout):
    g = torch.Generator().manual_seed(sum(layout))
    q = torch.randint(0, 16, (192, 96), generator=g)
    out = torch.empty(192, 96)
    got = cpu._unpack_rows(_pack(q, layout), 192, 96, out, torch.empty(192 * 96, dtype=torch.uint8), layout)
    assert torch.equal(got, q.float())


def test_unpack_with_the_other_layout_is_wrong():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (128, 64), generator=g)
    a, b = cpu.INT4PACK_LAYOUTS
    got = cpu._unpack_rows(_pack(q, a), 128, 64, torch.empty(128, 64), torch.empty(128 * 64, dtype=torch.uint8), b)
    assert (got != q.float()).float().mean() > 0.5


@pytest.mark.skipif(not hasattr(torch, "_convert_weight_to_int4pack_for_cpu"), reason="no int4pack CPU kernels")
def test_this_cpu_packs_in_a_known_layout():
    layout = cpu.int4pack_layout()
    assert layout in cpu.INT4PACK_LAYOUTS, f"torch {torch.__version__} packs int4 in an unknown layout on this CPU"
    q = torch.randint(0, 16, (2 * layout[0], 64), dtype=torch.int32)
    assert torch.equal(torch._convert_weight_to_int4pack_for_cpu(q, 2).view(-1), _pack(q, layout))
