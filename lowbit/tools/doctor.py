"""``lowbit doctor``: what this machine has for lowbit, on one screen.

The versions of lowbit's dependencies against what lowbit asks for (and, in a checkout, the versions its suite
last passed with, ``constraints.txt``), the CPU's model and the instruction-set flags kernels pick by, CUDA
devices, and which targets and backends work here, each with the reason and the fix when one does not.
It imports the heavy packages only to ask them (torch, onnxruntime) and runs without torch.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import json
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lowbit
from lowbit.host import cpu_flags, cpu_model, usable_cores
from lowbit.version import __version__


@dataclass(frozen=True)
class Package:
    dist: str        # distribution name, as pyproject and the lock spell it
    module: str      # import name
    why: str         # what lowbit uses it for, shown when it is missing


PACKAGES = (
    Package("torch", "torch", "compile, the torch backend"),
    Package("transformers", "transformers", "compile (loading and tracing models), tokenizers"),
    Package("safetensors", "safetensors", "weights"),
    Package("numpy", "numpy", "the ONNX Runtime backend"),
    Package("tokenizers", "tokenizers", "the torch-free runtime"),
    Package("onnx", "onnx", "--target onnx / tensorrt"),
    Package("onnx-ir", "onnx_ir", "--target onnx / tensorrt"),
    Package("onnxscript", "onnxscript", "--target onnx (ONNX Runtime's fused ops)"),
    Package("onnxruntime", "onnxruntime", "--backend ort"),
    Package("triton", "triton", "GPU kernels of the torch backend and the TensorRT plugins"),
    Package("onnxruntime-extensions", "onnxruntime_extensions", "a TensorRT artifact's ONNX in ONNX Runtime"),
    Package("onnxruntime-genai", "onnxruntime_genai", "bench/ peer; runs --target onnx artifacts too"),
    Package("tensorrt", "tensorrt", "lowbit build-engine, --backend tensorrt"),
    Package("jinja2", "jinja2", "chat templates (lowbit run --chat, engine.chat, lowbit serve)"),
    Package("fastapi", "fastapi", "lowbit serve"),
    Package("uvicorn", "uvicorn", "lowbit serve"),
)
BY_MODULE = {p.module: p for p in PACKAGES}
GPU_MIN_CAPABILITY = (8, 0)   # the Triton kernels and the TensorRT plugins: sm80 and newer


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(pkg: Package, provides: dict) -> Optional[str]:
    """The installed version of whichever distribution provides ``pkg``'s import name (onnxruntime-gpu for
    onnxruntime, tensorrt-cu12 for tensorrt, ...), or None."""
    if importlib.util.find_spec(pkg.module) is None:
        return None
    for dist in [pkg.dist] + sorted(provides.get(pkg.module, ())):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown version"


def asked_for() -> dict:
    """{canonical distribution name: (specifier, extra or None)} from lowbit's installed metadata."""
    out = {}
    for line in metadata.requires("lowbit") or ():
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*([^;]*)(?:;(.*))?", line)
        if not m:
            continue
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", m.group(3) or "")
        name = _canonical(m.group(1))
        if name not in out or out[name][1] is not None:      # a core requirement wins over an extra's
            out[name] = (m.group(2).strip(), extra.group(1) if extra else None)
    return out


def locked_versions() -> dict:
    """{canonical name: version} from constraints.txt when lowbit runs from a checkout (the suite's lock)."""
    lock = Path(lowbit.__file__).resolve().parents[1] / "constraints.txt"
    if not lock.is_file():
        return {}
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", lock.read_text(), re.M)
    return {_canonical(n): v for n, v in pins}


def satisfies(version: str, spec: str) -> Optional[bool]:
    """Whether ``version`` meets ``spec`` (None when ``packaging`` is not installed to tell)."""
    if not spec:
        return True
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:
        return None
    return SpecifierSet(spec).contains(version, prereleases=True)


def probe_torch() -> dict:
    try:
        import torch
    except Exception as e:           # a broken install says why, it does not stop the report
        return {"error": f"{type(e).__name__}: {e}"}
    info = {"cuda_build": torch.version.cuda, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "devices": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"name": p.name, "capability": [p.major, p.minor],
                                    "memory_gib": round(p.total_memory / 2**30, 1)})
    try:
        from lowbit.kernels.cpu import int4pack_layout_ok

        info["int4pack"] = int4pack_layout_ok()
    except Exception as e:
        info["int4pack"] = f"{type(e).__name__}: {e}"
    return info


def probe_onnxruntime() -> dict:
    try:
        import onnxruntime as ort
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"providers": ort.get_available_providers()}


def _tensorrt_ok(version: Optional[str]) -> Optional[str]:
    """Why TensorRT cannot build or run engines here, or None."""
    from lowbit.kernels.tensorrt.engine import MIN_VERSION

    if version is None:
        return "tensorrt is not installed (pip install tensorrt: NVIDIA's wheels, on a machine with its GPU)"
    if tuple(int(v) for v in re.findall(r"\d+", version)[:2]) < MIN_VERSION:
        return f"tensorrt {version} is older than {'.'.join(map(str, MIN_VERSION))}"
    return None


def usability(versions: dict, torch_info: dict, ort_info: dict) -> dict:
    """{"targets": {name: (ok, detail)}, "backends": {name: (ok, detail)}} for every entry of the registry."""
    from lowbit.targets import BACKENDS, TARGETS

    broken = {"torch": torch_info.get("error"), "onnxruntime": ort_info.get("error")}

    def missing(*modules):
        """Why the packages ``modules`` stop something here: not installed, or failing to import."""
        gone = [BY_MODULE[m].dist for m in modules if versions[m] is None]
        failing = [f"{m} fails to import ({broken[m]})" for m in modules if versions[m] and broken.get(m)]
        why = ([f"needs {', '.join(gone)} (pip install {' '.join(gone)})"] if gone else []) + failing
        return "; ".join(why) or None

    gpus = [d for d in torch_info.get("devices", ()) if tuple(d["capability"]) >= GPU_MIN_CAPABILITY]
    no_gpu = None if gpus else ("no CUDA GPU of sm80 or newer" if torch_info.get("devices") else
                                "no CUDA GPU" + (" (torch is a CPU build)" if "cuda_build" in torch_info
                                                 and not torch_info["cuda_build"] else ""))
    trt_why = _tensorrt_ok(versions["tensorrt"])
    compile_base = missing("torch", "transformers", "safetensors")
    onnx_base = compile_base or missing("onnx", "onnx_ir", "onnxscript")
    engine = "the engine builds here" if not (trt_why or no_gpu) else \
        f"no engine here: {'; '.join(w for w in (trt_why, no_gpu) if w)}"
    targets = {
        "torch": (compile_base is None, compile_base or "lowbit's torch runtime artifact"),
        "onnx": (onnx_base is None, onnx_base or "onnx/model.onnx for ONNX Runtime"),
        "tensorrt": (onnx_base is None, onnx_base or f"tensorrt/model.onnx; {engine}"),
        "hf-gptq": (compile_base is None, compile_base or "GPTQ checkpoint for vLLM / transformers (symmetric)"),
        "hf-awq": (compile_base is None, compile_base or "AWQ checkpoint for vLLM / transformers (4-bit)"),
        "compressed-tensors": (compile_base is None, compile_base or "compressed-tensors checkpoint for vLLM / "
                               "transformers (2-8 bit, W8A8)"),
        "gguf": (compile_base is None, compile_base or "model.gguf for llama.cpp (Q4_0 / Q8_0)"),
    }

    providers = ort_info.get("providers", [])
    torch_why = missing("torch")
    if torch_why:
        torch_detail = torch_why
    else:
        kernels = ("CPU: torch's int4pack / int8pack kernels for 4/8-bit matmuls" if torch_info.get("int4pack") is True
                   else "CPU: reference kernels only (this torch lacks the int4pack kernels lowbit uses)")
        cuda = (f"CUDA: {len(gpus)} GPU(s), " + ("Triton kernels" if versions["triton"] else
                                                 "reference kernels (pip install triton for the fast ones)")
                if gpus else f"CUDA: {no_gpu}")
        torch_detail = f"{kernels}; {cuda}"
    ort_why = missing("onnxruntime", "numpy")
    ort_detail = ort_why or ("providers " + ", ".join(p.replace("ExecutionProvider", "") for p in providers) +
                             ("" if "CUDAExecutionProvider" in providers else
                              "; no CUDA provider (pip install lowbit[gpu] on a CUDA machine)"))
    trt_backend = trt_why or no_gpu or missing("triton")
    ext = ("; --backend ort runs a TensorRT artifact's ONNX (plugins on their reference kernels)"
           if versions["onnxruntime_extensions"] and ort_why is None else
           "; --backend ort on a TensorRT artifact needs onnxruntime-extensions (pip install lowbit[tensorrt])")
    backends = {
        "torch": (torch_why is None, torch_detail),
        "ort": (ort_why is None, ort_detail),
        "tensorrt": (trt_backend is None, (trt_backend or "engines build and run here") + ext),
    }
    unknown = (set(TARGETS) - set(targets)) | (set(BACKENDS) - set(backends))
    assert not unknown, f"lowbit doctor does not know {sorted(unknown)}: add them to usability()"
    return {"targets": targets, "backends": backends}


def report() -> dict:
    """Everything ``lowbit doctor`` shows, as plain data (``--json``)."""
    provides = metadata.packages_distributions()
    asks, lock = asked_for(), locked_versions()
    versions = {p.module: installed_version(p, provides) for p in PACKAGES}
    packages = []
    for p in PACKAGES:
        spec, extra = asks.get(_canonical(p.dist), ("", None))
        v = versions[p.module]
        packages.append({"name": p.dist, "version": v, "asked": spec, "extra": extra, "used_for": p.why,
                         "satisfies": satisfies(v, spec) if v and v != "unknown version" else None,
                         "locked": lock.get(_canonical(p.dist))})
    torch_info = probe_torch() if versions["torch"] else {}
    ort_info = probe_onnxruntime() if versions["onnxruntime"] else {}
    use = usability(versions, torch_info, ort_info)
    return {
        "lowbit": __version__, "lowbit_path": str(Path(lowbit.__file__).parent),
        "python": platform.python_version(), "python_path": sys.executable, "platform": platform.platform(),
        "packages": packages,
        "cpu": {"model": cpu_model(), "cores": usable_cores(), "flags": cpu_flags(),
                "torch_capability": torch_info.get("cpu_capability"), "torch_threads": torch_info.get("threads")},
        "torch": torch_info, "onnxruntime": ort_info,
        "targets": {k: {"ok": ok, "detail": d} for k, (ok, d) in use["targets"].items()},
        "backends": {k: {"ok": ok, "detail": d} for k, (ok, d) in use["backends"].items()},
    }


def format_report(doc: dict) -> str:
    from lowbit.host import flag_family

    lines = [f"lowbit {doc['lowbit']} ({doc['lowbit_path']})",
             f"python {doc['python']} ({doc['python_path']}) on {doc['platform']}", "",
             f"{'package':24s} {'installed':18s} {'lowbit asks':16s} tested (constraints.txt)"]
    for p in doc["packages"]:
        asked = p["asked"] or "any"
        asked = f"{asked} [{p['extra']}]" if p["extra"] else asked
        version = p["version"] or "not installed"
        note = {False: "  <- outside what lowbit asks", None: ""}.get(p["satisfies"], "")
        if p["version"] is None:
            note = f"  ({p['used_for']})"
        elif p["locked"] and p["version"].split("+")[0] != p["locked"].split("+")[0] and not note:
            note = "  (not the lock's)"
        lines.append(f"{p['name']:24s} {version:18s} {asked:16s} {p['locked'] or '-'}{note}")
    cpu = doc["cpu"]
    missing = [f for f in flag_family() if f not in cpu["flags"]]
    lines += ["", f"CPU       {cpu['model']}, {cpu['cores']} usable cores",
              f"  flags   {' '.join(cpu['flags']) or 'none that kernels use'}",
              f"  lacks   {' '.join(missing) or 'nothing lowbit looks for'}"]
    if cpu["torch_capability"]:
        lines.append(f"  torch   ATen's CPU kernels at {cpu['torch_capability']}, {cpu['torch_threads']} threads")
    devices = doc["torch"].get("devices", [])
    gpu = "; ".join(f"{d['name']} (sm{d['capability'][0]}{d['capability'][1]}, {d['memory_gib']} GiB)"
                    for d in devices)
    build = doc["torch"].get("cuda_build")
    lines.append(f"CUDA      {gpu or 'no device'}" + (f" (torch built for CUDA {build})" if build else
                                                       " (torch is a CPU build)" if doc["torch"] else ""))
    for kind, title in (("targets", "lowbit compile --target"), ("backends", "lowbit run --backend")):
        lines += ["", f"{kind} ({title})"]
        for name, v in doc[kind].items():
            lines.append(f"  {name:10s} {'yes' if v['ok'] else 'NO '}  {v['detail']}")
    return "\n".join(lines)


def main(as_json: bool = False) -> int:
    doc = report()
    print(json.dumps(doc, indent=1) if as_json else format_report(doc))
    return 0
