"""What a compiled kernel's hot loop costs, read from its machine code (SASS), without a GPU.

At decode sizes a weight-only GEMM is meant to be a weight stream, and what keeps it from the memory
bandwidth is the instructions each weight costs: unpacking codes, converting them to floats, staging tiles
through shared memory. Those are fixed at compile time, so they can be counted from the cubin: nvdisasm (it
ships in the triton wheel) disassembles it, the longest backward branch is the main loop, and its
instructions are tallied per weight the loop iteration handles. ``python -m lowbit.kernels.triton.compile_check
--sass`` prints this for every kernel variant.

Issue slots are half of the question; the other half is whether enough bytes are in flight to cover the memory
latency (Little's law: bandwidth x latency). Triton prefetches the tiles that feed a dot ``num_stages - 1``
iterations ahead with cp.async (LDGSTS, counted by ``loop_profile``), so a program keeps that many weight tiles
in flight, and an SM as many programs as its registers, shared memory, warp and block slots hold
(``resident_programs``), or as many as the grid gives it (``compile_check`` multiplies the two). It is a model,
not a measurement: the latency to cover is an assumption, and nothing here sees DRAM or cache behaviour.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

_INSTR = re.compile(r"/\*[0-9a-f]{4}\*/\s+(.*?);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?(\.L_x_\d+)")
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+).*?LOCAL:(\d+)")      # spills land in the stack frame
_WIDTH = re.compile(r"\.[US]?(8|16|32|64|128)\b")        # a load's width in bits: LDG.E.U16, LDGSTS.E.128


class SM:
    """One SM's limits per compute capability, and the SM count of each architecture's reference GPU (A100,
    A6000, H100/H200): registers, shared memory per SM (bytes; each block also takes 1 KiB the driver
    reserves) and the most one block may use, warps, blocks."""

    COUNT = {80: 108, 86: 84, 90: 132}
    REGS = 65536
    SHARED = {80: 167936, 86: 102400, 89: 102400, 90: 233472}
    SHARED_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
    WARPS = {80: 64, 86: 48, 89: 48, 90: 64}
    BLOCKS = {80: 32, 86: 16, 89: 24, 90: 32}


def resident_programs(arch: int, regs: int, shared: int, warps: int) -> int:
    """Programs (blocks) of a kernel one SM holds at once: the tightest of its register file (allocated per
    warp in units of 256, threads' counts rounded up to 8), shared memory, warp slots and block slots."""
    warp_regs = -(-regs * 32 // 256) * 256 if regs else 256
    return min(SM.REGS // warp_regs // warps, SM.SHARED[arch] // (shared + 1024), SM.WARPS[arch] // warps,
               SM.BLOCKS[arch])


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _opcode(instr: str) -> str:
    """The base opcode of one SASS instruction: predicate and modifiers dropped (``@!P0 LDG.E.128`` -> LDG)."""
    return re.sub(r"^@!?U?P\w+\s+", "", instr).split()[0].split(".")[0]


def disassemble(cubin: bytes) -> tuple[str, str]:
    """(SASS text, resource usage text) of a cubin."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    return sass, res


def main_loop(sass: str) -> list[str]:
    """The instructions of the longest loop (from a label to the furthest backward branch to it)."""
    instrs, labels, best = [], {}, (0, -1)
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR.search(line)
        if not m:
            continue
        instrs.append(m.group(1))
        b = _BRANCH.search(m.group(1))
        if b and b.group(1) in labels and len(instrs) - 1 - labels[b.group(1)] > best[1] - best[0]:
            best = (labels[b.group(1)], len(instrs) - 1)
    return instrs[best[0]:best[1] + 1]


def _load_bytes(loop: list[str], opcode: str) -> int:
    """Bytes one thread moves per iteration with this load opcode (LDGSTS.E.BYPASS.128: 16, LDG.E.U16: 2, no
    width: 4)."""
    total = 0
    for instr in loop:
        if _opcode(instr) == opcode:
            mods = instr.split()[1 if instr.startswith("@") else 0]
            widths = _WIDTH.findall(mods)
            total += int(widths[-1]) // 8 if widths else 4
    return total


def loop_profile(cubin: bytes, weights_per_iteration: float) -> dict:
    """Registers, spill bytes and the main loop's instruction mix per weight (one thread's share of a tile).

    Keys: ``regs``, ``spill_bytes`` (stack frame and local memory per thread: register spills), ``loop``
    (instructions per iteration), ``per_weight`` (all of them), ``cvt`` (int -> float conversions, I2F, a
    quarter-rate pipe), ``smem_stores`` (STS), ``mma`` (tensor-core instructions: HMMA, HGMMA, IMMA, IGMMA),
    ``async_bytes`` (bytes one thread prefetches per iteration with cp.async, LDGSTS), ``by_opcode`` (a Counter
    of the loop's opcodes).
    """
    sass, res = disassemble(cubin)
    m = _RES.search(res)
    loop = main_loop(sass)
    ops = collections.Counter(_opcode(i) for i in loop)
    per = max(weights_per_iteration, 1e-9)
    return {"regs": int(m.group(1)) if m else None,
            "spill_bytes": int(m.group(2)) + int(m.group(3)) if m else None,
            "loop": len(loop), "per_weight": len(loop) / per, "cvt": ops["I2F"] / per,
            "smem_stores": ops["STS"] / per, "mma": sum(n for op, n in ops.items() if op.endswith("MMA")),
            "async_bytes": _load_bytes(loop, "LDGSTS"), "by_opcode": ops}
