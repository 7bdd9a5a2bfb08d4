"""``lowbit inspect``: what an artifact holds (recipe, per-layer formats, sizes, hashes), without loading it."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.format.artifact import GRAPH_FILE, PROGRAM_FILE, member, read_json, read_manifest


def _mib(n) -> str:
    return f"{n / 2**20:.2f} MiB"


def program_line(doc: dict) -> str:
    calls = [n["target"] for n in doc["nodes"] if n["op"] == "call"]
    ops = Counter(t.split(".")[0] for t in calls if t.startswith("lowbit::"))
    kv = doc.get("kv")
    step = f"step over a {len(kv)}-layer KV cache, one graph for prefill and decode" if kv else "forward"
    return (f"program    {PROGRAM_FILE}: {doc['task']} {step}; {len(calls)} ops, "
            + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())))


def describe(path, as_json: bool = False) -> str:
    path = Path(path)
    m = read_manifest(path, verify=True)        # hashes checked: inspect doubles as an integrity check
    layers = _json(path, m, GRAPH_FILE).get("layers", {}) if GRAPH_FILE in m["files"] else {}
    if as_json:
        return json.dumps({"manifest": m, "layers": layers}, indent=2)
    try:
        return _describe(path, m, layers)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        # A manifest that passed the checks but lacks a field this summary shows: the artifact is damaged.
        raise LowbitError(f"artifact '{path}': its manifest or {GRAPH_FILE} lacks or garbles a field ({type(e).__name__}: "
                          f"{str(e)[:80]}); recompile it") from None


def _json(path: Path, manifest: dict, name: str) -> dict:
    doc = read_json(member(path, manifest, name), f"artifact '{path}': {name}")
    if not isinstance(doc, dict):
        raise LowbitError(f"artifact '{path}': {name} is not a JSON object; recompile it")
    return doc


def _describe(path: Path, m: dict, layers: dict) -> str:
    r, s, src = m["recipe"], m.get("sizes", {}), m["source"]
    out = [f"artifact   {path}",
           f"format     {m['format']} v{m['format_version']}, target {m['target']}",
           f"source     {src['model_type']} {','.join(src.get('architectures', []))} ({src['task']})",
           f"           {src['path']}  sha256 {src['sha256'][:16]}...",
           f"recipe     {r['name']}: method {r['method']}, bits {r['bits']}, group {r['group_size']}, "
           f"{'sym' if r['sym'] else 'asym'}" + (f", INT{r['act_bits']} activations" if r.get("act_bits") else "")
           + (f", {len(r['overrides'])} overrides" if r.get("overrides") else ""),
           f"size       matmul weights {_mib(s.get('matmul_bytes_before', 0))} -> {_mib(s.get('matmul_bytes_after', 0))}; "
           f"model {_mib(s.get('model_bytes_before', 0))} -> weights file {_mib(s.get('weights_file_bytes', 0))}",
           "timings    " + ", ".join(f"{k} {v:.1f}s" for k, v in m.get("timings", {}).items()),
           "tools      " + ", ".join(f"{k} {v}" for k, v in m.get("tools", {}).items()),
           f"layers     {len(layers)} quantized of {s.get('matmul_layers', '?')} matmuls"]
    if PROGRAM_FILE in m["files"]:
        out.insert(-1, program_line(_json(path, m, PROGRAM_FILE)))
    for name, info in (m.get("rules") or {}).items():
        kinds = Counter(re.sub(r"\S*\.", "", r) for r in info["rewrites"])      # module paths -> last names
        out.insert(-1, f"rule       {name}: fired {info['fired']}x"
                   + (" (" + ", ".join(f"{k} x{v}" for k, v in kinds.items()) + ")" if kinds else "")
                   + "".join(f"; left alone {v}x: {k}" for k, v in info["skipped"].items()))
    if "onnx" in m:
        o = m["onnx"]
        out.insert(-1, f"onnx       onnx/{o['file']} {_mib(o['bytes'])}, opset {o['opset']}, accuracy_level "
                       f"{o['accuracy_level']}; ops " + ", ".join(f"{k} x{v}" for k, v in list(o["ops"].items())[:8]))
        if "exporter" in o:
            out.insert(-1, f"           written by {o['exporter']} in {o['export_seconds']} s"
                           + (f" ({o['exporter_note']})" if o.get("exporter_note") else ""))
        fused = o.get("fusions")
        if fused:
            out.insert(-1, "           ONNX Runtime fusions " + ("; ".join(f"{k} x{v}" for k, v in fused.items())
                                                             if "unavailable" not in fused else fused["unavailable"]))
        for op, why in o.get("fusions_missed", {}).items():
            out.insert(-1, f"           {op} not fused: {why}")
        if o.get("integer_matmuls"):
            out.insert(-1, "           MatMulInteger forms " + ", ".join(f"{k} x{v}" for k, v in
                                                                     o["integer_matmuls"].items())
                       + " (int32 sums exact on every CPU)")
    if "tensorrt" in m:
        t = m["tensorrt"]
        out.insert(-1, f"tensorrt   tensorrt/{t['file']} {_mib(t['bytes'])}, {t['precision']}, opset {t['opset']}, "
                       f"{t['int4_weights']} INT4 weights; plugins "
                       + (", ".join(f"{k} x{v}" for k, v in t["plugins"].items()) or "none")
                       + f"; checked against {t['checked_against']}")
        e = t.get("engine")
        out.insert(-1, "           engine " + (f"{e['file']} {_mib(e['bytes'])}, TensorRT {e['tensorrt']} on "
                                               f"{e['gpu']}, {e['plugins']} plugins, built in {e['seconds']} s"
                                               if e else "not built: lowbit build-engine on a TensorRT machine"))
    for name, layer in layers.items():
        group = "ch" if layer["group_size"] >= layer["in_features"] else layer["group_size"]
        kind = {"wna16_embedding": " embedding", "w8a8_linear": " int8-activations"}.get(layer["op"], "")
        out.append(f"  {name:48s} {layer['in_features']:>6d}x{layer['out_features']:<6d} w{layer['bits']} g{group} "
                   f"{'sym' if layer['sym'] else 'asym'} {layer['method']}{kind}")
    out.append("files")
    for name, digest in m["files"].items():
        out.append(f"  {name:40s} {(path / name).stat().st_size:>12d} B  sha256 {digest[:16]}...")
    # The manifest's strings are the artifact's: no terminal control sequences reach the user's terminal.
    return re.sub(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", "?", "\n".join(out))
