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
             "- timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in body["timings"].items())]
    if "calibration" in body:
        c = body["calibration"]
        lines.append(f"- calibration: {c['samples']} x {c['seq_len']} tokens of {c['text']} (seed {c['seed']}), "
                     f"peak activation memory {mib(c.get('peak_activation_bytes') or 0)}")
    for key, label in (("ppl_before", "perplexity before"), ("ppl_after", "perplexity after")):
        if key in body.get("metrics", {}):
            m = body["metrics"][key]
            lines.append(f"- {label}: {m['ppl']:.3f} ({m['windows']} windows, {m['tokens']} tokens)")
    lines += ["", "| layer | K | N | format | method | weight rel. error | GPTQ loss | time |",
              "|---|---|---|---|---|---|---|---|"]
    for name, q in graph.quantized.items():
        if q.op == "wna16_embedding":
            lines.append(f"| {name} (embedding) | {q.in_features} | {q.out_features} | {q.spec.describe()} | "
                         f"{q.method} | {q.stats.get('weight_rel_err', '')} | - | - |")
    for site in graph.sites.values():
        q = graph.quantized.get(site.name)
        if q is None:
            lines.append(f"| {site.name} | {site.in_features} | {site.out_features} | float | - | - | - | - |")
        else:
            st = q.stats
            t = f"{st['seconds']:.2f}s" if "seconds" in st else "-"
            lines.append(f"| {site.name} | {q.in_features} | {q.out_features} | {q.spec.describe()} | {q.method} | "
                         f"{st.get('weight_rel_err', '')} | {st.get('loss', '-')} | {t} |")
    if body.get("rules"):
        lines += ["", "## Fusion rules", "", "| rule | fired | left alone | rewrites |", "|---|---|---|---|"]
        for name, info in body["rules"].items():
            skipped = "; ".join(f"{k} x{v}" for k, v in info["skipped"].items()) or "-"
            shown = ", ".join(info["rewrites"][:4]) + (", ..." if len(info["rewrites"]) > 4 else "")
            lines.append(f"| {name} | {info['fired']} | {skipped} | {shown or '-'} |")
    if "lkd" in body:
        o = body["lkd"]["options"]
        lines += ["", f"## LKD: {o['steps']} Adam steps per block, lr {o['lr']}, batch {o['batch']}, {o['samples']} x "
                      f"{o['seq_len']} tokens of {o['data']} data, student on {o.get('inputs', 'float')} inputs, "
                      f"{o.get('loss', 'mse')} loss ({body['lkd']['seconds']:.1f}s)", "",
                  "| block | loss before | loss after | kept | time |", "|---|---|---|---|---|"]
        for name, b in body["lkd"]["blocks"].items():
            lines.append(f"| {name} | {b['loss_before']:.4g} | {b['loss_after']:.4g} | {'yes' if b['kept'] else 'no'} | "
                         f"{b['seconds']:.1f}s |")
    path.write_text("\n".join(lines) + "\n")
