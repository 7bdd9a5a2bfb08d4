"""report.md: the human summary of a compile (recipe, sizes, timings, every layer)."""

from __future__ import annotations

from pathlib import Path

from lowbit.format.quantize import MAX_LISTED_OUTLIERS, OUTLIER_STEP_RATIO


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


MAX_WARNED_LAYERS = 5          # compile output: one warning line for each of the first layers, then a count


def outlier_layers(graph_or_layers) -> list:
    """The quantized layers (a Graph's, or any iterable / mapping of QuantizedLayer) with an outlier weight group."""
    layers = getattr(graph_or_layers, "quantized", graph_or_layers)
    layers = layers.values() if hasattr(layers, "values") else layers
    return [q for q in layers if q.stats.get("outlier_groups")]


def _columns(q, group: int) -> str:
    return f"{group * q.group_size}-{min((group + 1) * q.group_size, q.in_features) - 1}"


def outlier_lines(graph_or_layers) -> list[str]:
    """Compile-output warnings: one per layer with outlier weight groups (the first MAX_WARNED_LAYERS, then how many
    more), its largest-step group's place and max |error| against the layer's mean |error|."""
    bad = outlier_layers(graph_or_layers)
    lines = []
    for q in bad[:MAX_WARNED_LAYERS]:
        st, o = q.stats, q.stats["outliers"][0]
        n = st["outlier_groups"]
        lines.append(f"warning: {q.name}: {n} outlier weight group{'s' if n > 1 else ''} (row {o['row']}, group "
                     f"{o['group']} = columns {_columns(q, o['group'])}: step {o['step_ratio']:.3g}x the layer's "
                     f"median, max |error| {o['max_abs_err']:.3g} vs the layer's mean {st['weight_mean_abs_err']:.3g}); "
                     "a weight far outside its group rounds the rest to zero: check the checkpoint, or keep the layer "
                     "float (recipe override skip = true)")
    if len(bad) > MAX_WARNED_LAYERS:
        lines.append(f"warning: {len(bad) - MAX_WARNED_LAYERS} more layers have outlier weight groups (see report.md)")
    return lines


def outlier_section(graph) -> list[str]:
    """report.md's table of outlier weight groups (nothing when there are none)."""
    bad = outlier_layers(graph)
    if not bad:
        return []
    lines = ["", "## Outlier weight groups", "",
             f"Groups whose quantization step is over {OUTLIER_STEP_RATIO:g}x their layer's median step: one weight far "
             "outside the rest of its group, whose other weights then round to the zero point. Up to "
             f"{MAX_LISTED_OUTLIERS} per layer, largest step first.", "",
             "| layer | row | group (columns) | max abs. error | layer mean abs. error | group MSE / median | "
             "step / median | outlier groups in layer |", "|---|---|---|---|---|---|---|---|"]
    for q in bad:
        st = q.stats
        for o in st["outliers"]:
            lines.append(f"| {q.name} | {o['row']} | {o['group']} ({_columns(q, o['group'])}) | {o['max_abs_err']:.4g} "
                         f"| {st['weight_mean_abs_err']:.4g} | {o['mse_ratio']:.4g} | {o['step_ratio']:.4g} | "
                         f"{st['outlier_groups']} |")
    return lines


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
    if "rotate" in body:
        o = body["rotate"]
        lines.append(f"- rotations: residual stream ({o['dim']} channels, {o['norms']} norms, {o['writers']} writers), "
                     f"{o['values']} attentions' values"
                     + (f"; untied: {', '.join(o['untied'])}" if o["untied"] else ""))
    if "online_rotate" in body:
        o = body["online_rotate"]
        lines.append(f"- online rotations ({o['which']}): {o['rotations']} inputs of {o['matmuls']} matmuls (widths "
                     f"{', '.join(map(str, o['dims']))})")
    if "budget" in body:
        b = body["budget"]
        lines.append(f"- size budget {b['budget_bits']:g} bits per weight: {b['bits_per_weight']:.3f} used, "
                     + ", ".join(f"{n} layers {f}" for f, n in sorted(b["formats"].items()))
                     + " (plan.toml: the plan as a recipe)")
        lines.append(f"- the plan's estimated perplexity: {b['estimated_ppl_ratio']:.3f}x float on the calibration "
                     "windows; other budgets: " + ", ".join(f"{k} bits {v:.3f}x" for k, v in b["other_budgets"].items()))
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
    lines += outlier_section(graph)
    if body.get("rules"):
        lines += ["", "## Fusion rules", "", "| rule | fired | left alone | rewrites |", "|---|---|---|---|"]
        for name, info in body["rules"].items():
            skipped = "; ".join(f"{k} x{v}" for k, v in info["skipped"].items()) or "-"
            shown = ", ".join(info["rewrites"][:4]) + (", ..." if len(info["rewrites"]) > 4 else "")
            lines.append(f"| {name} | {info['fired']} | {skipped} | {shown or '-'} |")
    if "lkd" in body:
        o = body["lkd"]["options"]
        learnt = ("Adam steps on the weights" if o.get("learn", "weights") == "weights"
                  else "sign-gradient steps on the rounding")
        lr = body["lkd"].get("lr_used", o["lr"])
        lines += ["", f"## LKD: {o['steps']} {learnt} per block, lr {lr:g}, batch {o['batch']}, {o['samples']} x "
                      f"{o['seq_len']} tokens of {o['data']} data, student on {o.get('inputs', 'float')} inputs, "
                      f"{o.get('loss', 'mse')} loss ({body['lkd']['seconds']:.1f}s)", "",
                  "| block | loss before | loss after | kept | time |", "|---|---|---|---|---|"]
        for name, b in body["lkd"]["blocks"].items():
            lines.append(f"| {name} | {b['loss_before']:.4g} | {b['loss_after']:.4g} | {'yes' if b['kept'] else 'no'} | "
                         f"{b['seconds']:.1f}s |")
    path.write_text("\n".join(lines) + "\n")
