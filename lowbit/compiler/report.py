"""report.md: the human summary of a compile (recipe, sizes, timings, every layer)."""

from __future__ import annotations

from pathlib import Path


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def write_report(path: Path, body: dict, graph) -> None:
    s, r = body["sizes"], body["recipe"]
    lines = [f"# lowbit artifact: {body['source']['model_type']} / recipe {r['name']}", "",
             f"- source: `{body['source']['path']}` (sha256 {body['source']['sha256'][:16]}...)",
             f"- target: {body['target']}",
             f"- matmul weights: {mib(s['matmul_bytes_before'])} -> {mib(s['matmul_bytes_after'])} "
             f"({s['quantized_layers']}/{s['matmul_layers']} layers quantized)",
             f"- weights file: {mib(s['weights_file_bytes'])} (model before: {mib(s['model_bytes_before'])})",
             "- timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in body["timings"].items()), "",
             "| layer | K | N | format | method | weight rel. error |", "|---|---|---|---|---|---|"]
    for name, q in graph.quantized.items():
        if q.op == "wna16_embedding":
            lines.append(f"| {name} (embedding) | {q.in_features} | {q.out_features} | {q.spec.describe()} | "
                         f"{q.method} | {q.stats.get('weight_rel_err', '')} |")
    for site in graph.sites.values():
        q = graph.quantized.get(site.name)
        if q is None:
            lines.append(f"| {site.name} | {site.in_features} | {site.out_features} | float | - | - |")
        else:
            err = q.stats.get("weight_rel_err", "")
            lines.append(f"| {site.name} | {q.in_features} | {q.out_features} | {q.spec.describe()} | {q.method} | {err} |")
    path.write_text("\n".join(lines) + "\n")
