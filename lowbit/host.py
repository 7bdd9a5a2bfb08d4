"""What this machine's CPU is: its model and the instruction-set flags that decide which kernels CPU runtimes
pick. No torch, so the torch-free runtime and ``lowbit doctor`` can use it."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

# The flags that decide which integer and float kernels torch, ONNX Runtime (MLAS) and llama.cpp pick on this
# CPU, as /proc/cpuinfo names them.
X86_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "avx_vnni", "avx_vnni_int8", "amx_tile", "amx_int8", "amx_bf16")
ARM_FLAGS = ("asimddp", "i8mm", "bf16", "sve", "sve2")
CPU_FLAGS = X86_FLAGS + ARM_FLAGS


def flag_family() -> tuple:
    """The flags that can exist on this machine's architecture."""
    return ARM_FLAGS if platform.machine().lower() in ("aarch64", "arm64") else X86_FLAGS


def _cpuinfo() -> str:
    info = Path("/proc/cpuinfo")
    return info.read_text() if info.is_file() else ""


def cpu_model() -> str:
    m = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.M)
    return m.group(1).strip() if m else (platform.processor() or platform.machine())


def cpu_flags() -> list[str]:
    """The CPU_FLAGS this CPU has, in CPU_FLAGS' order (empty where /proc/cpuinfo does not exist)."""
    f = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", _cpuinfo(), re.M)
    have = set(f.group(1).split()) if f else set()
    return [x for x in CPU_FLAGS if x in have]


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers narrow), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def describe_cpu() -> str:
    """'<model name>; flags: <the CPU_FLAGS it has>', the line benchmarks print beside their numbers."""
    flags = cpu_flags()
    return f"{cpu_model()}; flags: {' '.join(flags) or 'none of ' + ' '.join(CPU_FLAGS)}"


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere). glibc raises
    its mmap threshold to the largest block freed so far (up to 32 MiB), so a long run that frees many tensors of
    a few MiB leaves them in the heap, and the resident set grows although nothing is held."""
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_bytes() -> int:
    """This process's resident set in bytes (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class MemoryReleaser:
    """``release_free_memory`` when the resident set grew by ``margin`` bytes since it last ran: often enough to
    bound what a long run of allocations and frees leaves in the heap, rarely enough that the next work does not
    fault the same pages in again each time (after every step of GPTQ's calibrator: 25% more time on the demo LM)."""

    def __init__(self, margin: int = 128 << 20):
        self.margin = margin
        self.floor = resident_bytes()

    def __call__(self) -> None:
        if resident_bytes() > self.floor + self.margin:
            release_free_memory()
            self.floor = resident_bytes()
