"""Lowering to TensorRT: the shipped program as ONNX in TensorRT's dialect, plus the plugin catalog.

The ``tensorrt`` target is the torch target plus ``tensorrt/model.onnx``, written by lowbit's emitter
(``lowering.onnx.fx_onnx``) from the same fused program, with the quantized ops in the forms TensorRT runs:

- weight-only INT4 (and 2/3-bit codes, which fit INT4 exactly): ``DequantizeLinear`` of an INT4 initializer
  [K, N] blocked along K (blocks of 128 or 64 dividing the group, each with its group's scale; per-channel weights
  in blocks too; K padded with zero rows to whole blocks, x with zero columns), zero points left out
  (TensorRT takes only zero), then ``MatMul``. Symmetric weights store ``code - 2^(bits-1)``. Asymmetric ones store ``code - 8`` and
  add the zero point back by folding: ``W = s (q - 8) + s (8 - z)``, and the second term, constant per group,
  is one small GEMM on the activations' group sums, ``y += sum_g(x) @ C`` with C [K / g, N];
- weight-only INT8, per channel: ``DequantizeLinear`` of an INT8 initializer with per-column scales (asymmetric:
  ``code - 128`` and the same fold on the row sums);
- W8A8 (per-token INT8 activations): TensorRT has no dynamic per-token INT8, so the plugins of
  ``lowbit.kernels.tensorrt``: ``quantize_int8`` (or the fused norm / activation + quantize of the fusion rules)
  and ``int8_linear``;
- everything else as standard ONNX operators in the artifact's precision (float16 by default; bfloat16 or
  float32 on request): attention as MatMul / Softmax / MatMul, the gated activation as Sigmoid / Erf / Tanh
  formulas.

What TensorRT cannot run is refused before any pass with the reason (``check``): INT4 groups that 64 does not
divide, grouped weight-only INT8, a quantized embedding (TensorRT's Gather takes no INT4). The written model must
pass ``onnx.checker`` and use only operators of onnx-tensorrt's support table (``tensorrt_ops``) plus the
plugins. Engine building is ``lowbit build-engine`` (``kernels.tensorrt.engine``), on a machine with TensorRT.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.format.artifact import TENSORRT_FILE, TENSORRT_PLUGINS_FILE
from lowbit.format.quantize import block_groups, unpack_codes
from lowbit.kernels.tensorrt import NAMESPACE, PLUGIN_DOMAIN, PLUGINS, describe
from lowbit.lowering.tensorrt.options import TensorRTOptions

OPSET = 22                       # blocked DequantizeLinear and INT4 (21); bfloat16 Cos, Sin, ... (22)
BLOCKS = (64, 128)               # INT4 block sizes TensorRT takes
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}   # options.PRECISIONS
MIN_W8A8_GROUP = 32              # the INT8 GEMM's smallest K tile (kernels/triton/w8a8.py)


def int4_block(group: int, k: int) -> int | None:
    """The TensorRT INT4 block for a lowbit group: 128 or 64 when it divides the group (blocks then share their
    group's scale), the whole K for per-channel weights (padded to a block); None when neither divides it."""
    if group >= k:
        return BLOCKS[0] if k <= BLOCKS[0] else BLOCKS[-1]
    return next((b for b in reversed(BLOCKS) if group % b == 0), None)


def refusal(name: str, bits: int, group: int, k: int, act_bits: int) -> str | None:
    """Why TensorRT (with lowbit's plugins) cannot run a layer of this format, or None."""
    if act_bits:
        if group < k and group % MIN_W8A8_GROUP:
            return (f"layer {name}: W8A8 with group size {group} (the int8_linear plugin needs per-channel weights or "
                    f"groups a multiple of {MIN_W8A8_GROUP})")
        return None
    if bits <= 4:
        if int4_block(group, k) is None:
            return (f"layer {name}: INT4 group size {group}, but TensorRT takes INT4 weights in blocks of "
                    f"{' or '.join(map(str, BLOCKS))} along K; use a group size that is a multiple of 64, or "
                    "per-channel")
        return None
    if group < k:
        return (f"layer {name}: {bits}-bit weights in groups of {group}, but TensorRT dequantizes INT8 per channel "
                "only; use a per-channel 8-bit recipe (group_size = 0) or 4-bit groups of 64 / 128")
    return None


def check_tensorrt_lowerable(graph, recipe):
    """Before any pass runs: refuse layers TensorRT cannot run, with the reason."""
    from lowbit.passes.rtn import quantizable

    for site, spec in quantizable(graph, recipe):
        why = refusal(site.name, spec.bits, spec.group(site.in_features), site.in_features, spec.act_bits)
        if why:
            raise LowbitError(f"target tensorrt: {why}")
    emb = graph.embeddings.get(graph.input_embedding) if graph.input_embedding else None
    if emb is not None and recipe.spec_for(emb.name, embedding=True) is not None:
        raise LowbitError("target tensorrt: the recipe quantizes the token embedding, but TensorRT's Gather takes no "
                          "INT4 table; set quantize_embeddings = false")


# ---- weights in TensorRT's layouts (compile time) --------------------------------------------------------------
def dequantize_linear_weight(qweight, scales, zeros, bits: int, group: int, k: int) -> dict:
    """A lowbit weight-only layer as ``DequantizeLinear`` operands: ``codes`` int8 [Kp, N] (in INT4's range for
    bits <= 4, INT8's otherwise), ``scales`` float32 ([Kp / block, N] blocked, or [N] per channel for 8 bits), the
    ``block`` (None per channel), ``kp`` (K padded to whole blocks) and ``fold`` float32 (shaped like ``scales``):
    ``s * (center - z)``, the zero points' term, None for symmetric weights."""
    codes = unpack_codes(qweight, bits, k).to(torch.int16)                 # [N, K]
    z = zeros.to(torch.int16)                                             # [N, G]
    mid = 1 << (bits - 1)
    symmetric = bool((z == mid).all())
    center = mid if symmetric else (8 if bits <= 4 else 128)
    s = scales.float()
    fold = None if symmetric else s * (center - z).float()                # [N, G]
    if bits > 4:                                                          # INT8: per channel
        kp, block, s_out, fold = k, None, s[:, 0], None if fold is None else fold[:, 0]
    else:
        block = int4_block(group, k)
        owner = block_groups(k, block, group, s.shape[1])
        kp = len(owner) * block
        s_out = s[:, owner].t()
        fold = None if fold is None else fold[:, owner].t()
    w = F.pad(codes - center, (0, kp - k)).to(torch.int8).t().contiguous()     # [Kp, N]
    return {"codes": w, "scales": s_out.contiguous(), "block": block, "kp": kp,
            "fold": None if fold is None else fold.contiguous(), "bits": 4 if bits <= 4 else 8}


def int8_linear_weight(qweight, scales, zeros, bits: int, group: int, k: int) -> dict:
    """A symmetric W8A8 layer as ``int8_linear`` operands: int8 weight [N, K], float32 scales [N, G]."""
    from lowbit.ops import signed_weight

    return {"weight": signed_weight(qweight, zeros, bits, k, group).contiguous(),
            "weight_scales": scales.float().contiguous(), "group_size": min(group, k)}


# ---- the TensorRT forms of lowbit's ops (handlers of fx_onnx's Emitter) ------------------------------------------
def _const_tensor(e, x) -> torch.Tensor:
    if x not in e.consts:
        raise LowbitError(f"target tensorrt: {x.name} is not a constant weight; recompile")
    return e.consts[x][0]


def _plugin(e, name: str, *inputs, **attrs):
    """A plugin node: op type = the plugin's name, namespace and AOT flag as the ONNX parser reads them."""
    return e.op(name, *inputs, domain=PLUGIN_DOMAIN, outputs=len(PLUGINS[name].output_kinds),
                plugin_namespace=NAMESPACE, aot=1, **attrs)


def _scalar(e, dtype):
    return lambda v: e.const(float(v), dtype)


def _epilogue(e, node, y, bias, dtype):
    if bias is not None:
        y = e.op("Add", y, e.tensor(bias, dtype))
    residual = node.kwargs.get("residual")
    return y if residual is None else e.op("Add", y, e.tensor(residual, dtype))


def _wna16_linear(e, node):
    import ml_dtypes
    import onnx_ir as ir

    x, qw, s, z, bias, bits, group, k = node.args[:8]
    dtype = e.dtype(node)
    t = dequantize_linear_weight(_const_tensor(e, qw), _const_tensor(e, s), _const_tensor(e, z), bits, group, k)
    base = e.consts[qw][1]
    storage = ml_dtypes.int4 if t["bits"] == 4 else np.int8
    w = e.initializer(f"{base}_trt_codes", ir.tensor(t["codes"].numpy().astype(storage), name=f"{base}_trt_codes"))
    scales = e.const(t["scales"].to(dtype), name=f"{base}_trt_scales")
    attrs = {"axis": 0, "block_size": t["block"]} if t["block"] else {"axis": 1}
    weight = e.op("DequantizeLinear", w, scales, **attrs)                       # [Kp, N] in dtype
    xv = e.tensor(x, dtype)
    if t["kp"] != k:
        rank = e.rank(x)
        xv = e.op("Pad", xv, e.const([0] * (2 * rank - 1) + [t["kp"] - k], torch.int64))
    y = e.op("MatMul", xv, weight)
    if t["fold"] is not None:
        fold = e.const(t["fold"].to(dtype), name=f"{base}_trt_fold")
        if t["block"]:
            groups = t["kp"] // t["block"]
            shape = e.op("Concat", e.op("Shape", xv, end=-1), e.const([groups, t["block"]], torch.int64), axis=0)
            sums = e.op("ReduceSum", e.op("Reshape", xv, shape), e.const([-1], torch.int64), keepdims=0)
            y = e.op("Add", y, e.op("MatMul", sums, fold))                          # [..., G] @ [G, N]
        else:
            sums = e.op("ReduceSum", xv, e.const([-1], torch.int64), keepdims=1)
            y = e.op("Add", y, e.op("Mul", sums, fold))
    return _epilogue(e, node, y, bias, dtype)


def _int8_linear(e, node, codes, row_scales, args, dtype):
    qw, s, z, bias, bits, group, k = args
    base = e.consts[qw][1]
    t = int8_linear_weight(_const_tensor(e, qw), _const_tensor(e, s), _const_tensor(e, z), bits, group, k)
    n = t["weight"].shape[0]
    b = e.tensor(bias, dtype) if bias is not None else e.const(torch.zeros(n, dtype=dtype), name=f"{base}_trt_nobias")
    y = _plugin(e, "int8_linear", codes, row_scales, e.const(t["weight"], name=f"{base}_trt_w8"),
                e.const(t["weight_scales"], name=f"{base}_trt_w8_scales"), b, group_size=t["group_size"])
    return _epilogue(e, node, y, None, dtype)


def _w8a8_linear(e, node):
    dtype = e.dtype(node)
    codes, row_scales = _plugin(e, "quantize_int8", e.tensor(node.args[0], dtype))
    return _int8_linear(e, node, codes, row_scales, node.args[1:8], dtype)


def _w8a8_linear_codes(e, node):
    return _int8_linear(e, node, e.v(node.args[0]), e.v(node.args[1]), node.args[2:9], e.dtype(node))


def _rmsnorm_quant_int8(e, node):
    x, weight, eps = node.args
    dtype = e.dtype(x)
    return _plugin(e, "rmsnorm_quant_int8", e.v(x), e.tensor(weight, dtype), eps=float(eps))


def _layernorm_quant_int8(e, node):
    x, weight, bias, eps = node.args
    dtype = e.dtype(x)
    dim = e.out_type(x)[1][-1]
    w = e.tensor(weight, dtype) if weight is not None else e.const(torch.ones(dim, dtype=dtype))
    b = e.tensor(bias, dtype) if bias is not None else e.const(torch.zeros(dim, dtype=dtype))
    return _plugin(e, "layernorm_quant_int8", e.v(x), w, b, eps=float(eps))


def _act_mul_quant_int8(e, node):
    return _plugin(e, "act_mul_quant_int8", e.v(node.args[0]), act=str(node.args[1]))


def _act_mul(e, node):
    from lowbit.lowering.onnx.translations import activation

    y, act = node.args
    gate, up = e.op("Split", e.v(y), axis=-1, num_outputs=2)
    return e.op("Mul", activation(e.onnx, gate, act, _scalar(e, e.dtype(y))), up)


def _rotate(e, node):
    from lowbit.lowering.onnx.translations import rotation

    x, signs, left, right = node.args
    dtype = e.dtype(x)
    return rotation(e.onnx, e.v(x), e.tensor(signs, dtype), e.tensor(left, dtype), e.tensor(right, dtype))


def _attention(e, node):
    from lowbit.lowering.onnx.translations import scaled_dot_product

    q, k, v, mask, scale, groups = node.args
    dtype = e.dtype(q)
    out = scaled_dot_product(e.onnx, e.v(q), e.v(k), e.v(v), None if mask is None else e.v(mask), scale, groups,
                             _scalar(e, dtype), float(torch.finfo(dtype).min))
    return e.op("Transpose", out, perm=[0, 2, 1, 3])


def handlers() -> dict:
    L = torch.ops.lowbit
    return {L.wna16_linear.default: _wna16_linear, L.w8a8_linear.default: _w8a8_linear,
            L.w8a8_linear_codes.default: _w8a8_linear_codes, L.rmsnorm_quant_int8.default: _rmsnorm_quant_int8,
            L.layernorm_quant_int8.default: _layernorm_quant_int8, L.act_mul_quant_int8.default: _act_mul_quant_int8,
            L.act_mul.default: _act_mul, L.attention.default: _attention, L.rotate.default: _rotate}


# ---- export -----------------------------------------------------------------------------------------------------
def export_tensorrt_onnx(gm: torch.fx.GraphModule, program: dict, vocab: int, dest: Path, dtype: torch.dtype) -> dict:
    """``gm`` (the program decoded in ``dtype``) as TensorRT-dialect ONNX at ``dest``; the manifest's entry."""
    from lowbit.frontend.trace import exporting
    from lowbit.lowering.onnx.fx_onnx import Unsupported, to_onnx
    from lowbit.lowering.onnx.lower import example_inputs, optimize_onnx, program_io, save_onnx

    def runs_at(sizes):
        args, dims = example_inputs(program, vocab, sizes)
        return tuple(a.to(dtype) if a.is_floating_point() else a for a in args), dims

    precision = str(dtype).removeprefix("torch.")
    args, dims = runs_at((2, 3, 4))
    inputs, outputs, kv_info = program_io(program)
    if kv_info:
        kv_info["dtype"] = precision
    t0 = time.perf_counter()
    runs = [args] + [runs_at(sizes)[0] for sizes in ((3, 5, 7), (5, 4, 9))]
    try:
        model = to_onnx(gm, runs, inputs, [dims[n] for n in program["inputs"]], outputs, OPSET, handlers(),
                        {PLUGIN_DOMAIN: 1})
    except Unsupported as e:
        raise LowbitError(f"target tensorrt: lowbit's ONNX emitter does not translate this model ({e}); use "
                          "--target onnx") from None
    with exporting():
        optimize_onnx(model, rewrite=False)
    export_s = time.perf_counter() - t0
    external = save_onnx(model, dest)
    return {"file": dest.name, "opset": OPSET, "precision": precision,
            "export_seconds": round(export_s, 2), "external_data": external, "inputs": inputs, "outputs": outputs,
            "kv_cache": kv_info, **check_tensorrt_onnx(dest)}


def check_tensorrt_onnx(path: Path) -> dict:
    """onnx.checker, TensorRT's operator table and the plugin nodes' attributes on a written model; its op
    histogram, plugin counts and weight bytes. Raises on the first problem."""
    from collections import Counter

    import onnx

    from lowbit.lowering.onnx.lower import op_name, run_checker
    from lowbit.lowering.tensorrt.tensorrt_ops import TENSORRT_VERSION, check_ops

    run_checker(path, "TensorRT ONNX model")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    problems = check_ops(model, PLUGIN_DOMAIN)
    if problems:
        raise LowbitError(f"the TensorRT ONNX model uses what TensorRT {TENSORRT_VERSION}'s ONNX parser rejects: "
                          f"{', '.join(problems[:5])}; report this as a lowbit bug")
    plugins = Counter()
    for node in model.graph.node:
        if node.domain != PLUGIN_DOMAIN:
            continue
        attrs = {a.name for a in node.attribute}
        plugin = PLUGINS.get(node.op_type)
        want = {"plugin_namespace", "aot", *(k for k, _ in plugin.attrs)} if plugin else set()
        if plugin is None or attrs != want:
            raise LowbitError(f"plugin node {node.name} ({node.op_type}) has attributes {sorted(attrs)}, expected "
                              f"{sorted(want)}; report this as a lowbit bug")
        plugins[node.op_type] += 1
    ops = Counter(op_name(n) for n in model.graph.node)
    return {"bytes": sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file() and f.name.startswith("model")),
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])), "plugins": dict(plugins),
            "int4_weights": sum(1 for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4),
            "checked_against": f"onnx-tensorrt operators, TensorRT {TENSORRT_VERSION}"}


def write_tensorrt_target(tmp: Path, vocab: int, precision: str = "float16") -> dict:
    """Add ``tensorrt/model.onnx`` and ``tensorrt/plugins.json`` to a staged torch-target artifact in ``tmp``."""
    from lowbit.lowering.program import staged_program

    TensorRTOptions(precision)                  # the range, for direct callers
    dtype = DTYPES[precision]
    # The model's float32 upcasts stay float32: a float16 RMSNorm's variance overflows past |x| = 256, and
    # bfloat16 rotary positions are exact only to 256.
    program, gm = staged_program(tmp, dtype, keep_precision=True)
    info = export_tensorrt_onnx(gm, program, vocab, tmp / TENSORRT_FILE, dtype)
    (tmp / TENSORRT_PLUGINS_FILE).write_text(json.dumps(describe(), indent=1) + "\n")
    return info


class TensorRTLowering:
    """The ``tensorrt`` target (``lowbit.targets``): the torch target, then its program as TensorRT-dialect ONNX.
    Its options: ``TensorRTOptions`` (``options.py``)."""
    fuse = True
    streams = True           # compiles block by block from the checkpoint (compiler/stream.py)

    def prepare(self, recipe, options: TensorRTOptions):
        return recipe

    def check(self, graph, recipe):
        check_tensorrt_lowerable(graph, recipe)

    def write(self, tmp: Path, graph, loaded, recipe, options: TensorRTOptions, timings: dict, quiet: bool) -> dict:
        from lowbit.lowering.program import LOWERING as TORCH
        from lowbit.progress import say, timed

        body = TORCH.write(tmp, graph, loaded, recipe, options, timings, quiet)
        precision = options.precision
        with timed(timings, "export_tensorrt_onnx", quiet, f"writing TensorRT ONNX ({precision})"):
            info = write_tensorrt_target(tmp, graph.vocab_size, precision)
        say(f"TensorRT ONNX: {info['bytes'] / 2**20:.1f} MiB, {info['int4_weights']} INT4 weights, plugins "
            + (", ".join(f"{k} x{v}" for k, v in info["plugins"].items()) or "none"), quiet)
        info["engine"] = self._engine(tmp, info, timings, quiet)
        return {**body, "tensorrt": info}

    @staticmethod
    def _engine(tmp: Path, info: dict, timings: dict, quiet: bool) -> dict | None:
        """The engine, built now when TensorRT and a GPU are here (its files written into ``tmp``); else None, and
        ``lowbit build-engine`` builds it later on the target machine."""
        from lowbit.kernels.tensorrt.engine import Limits, engine_files, require_gpu, require_tensorrt
        from lowbit.progress import say, timed

        try:
            require_tensorrt()
            require_gpu()
        except LowbitError as e:
            say(f"no TensorRT engine built ({e}); build it with 'lowbit build-engine ARTIFACT' where TensorRT is", quiet)
            return None
        with timed(timings, "build_tensorrt_engine", quiet, "building the TensorRT engine"):
            files, record = engine_files(tmp / TENSORRT_FILE, info, Limits(), None, aot=True)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        return record


LOWERING = TensorRTLowering()
