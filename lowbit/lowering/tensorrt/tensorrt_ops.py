"""The ONNX operators TensorRT's ONNX parser (onnx-tensorrt) supports, and the check that a model uses only them.

Transcribed from onnx-tensorrt's ``docs/operators.md`` for TensorRT 10.15 (opsets 9 to 24): each supported operator
with the types it supports (for the operators lowbit's emitter writes, of its first input). Operators marked
unsupported there (``MatMulInteger``, ``DynamicQuantizeLinear``, the ``Bitwise*`` ops, ...) are absent.
"""

from __future__ import annotations

from collections import Counter

TENSORRT_VERSION = "10.15"
OPSETS = (9, 24)
_F = "FP32, FP16, BF16"
_FI = _F + ", INT32, INT64"
_FIB = _FI + ", BOOL"
_TABLE = {
    "Abs": _FI, "Acos": _F, "Acosh": _F, "Add": _FI, "And": "BOOL", "ArgMax": _FI, "ArgMin": _FI, "Asin": _F,
    "Asinh": _F, "Atan": _F, "Atanh": _F, "Attention": _F + ", INT8, FP8", "AveragePool": _F,
    "BatchNormalization": _F, "BlackmanWindow": "FP32, FP16", "Cast": _FI + ", UINT8, BOOL",
    "CastLike": _FI + ", UINT8, BOOL", "Ceil": _F, "Celu": _F, "Clip": _F, "Concat": _FIB,
    "Constant": _F + ", FP8, FP4, INT4, INT32, INT64, BOOL", "ConstantOfShape": _F + ", FP8, FP4, INT4, INT32, INT64, BOOL",
    "Conv": _F, "ConvTranspose": _F, "Cos": _F, "Cosh": _F, "CumSum": _F, "DeformConv": "FP32, FP16",
    "DepthToSpace": _FI, "DequantizeLinear": "INT8, FP8, FP4, INT4", "Div": _FI, "Dropout": _F, "Einsum": _F,
    "Elu": _F, "Equal": _FI, "Erf": _F, "Exp": _F, "Expand": _FIB, "EyeLike": _FIB, "Flatten": _FIB, "Floor": _F,
    "Gather": _FIB, "GatherElements": _FIB, "GatherND": _FIB, "Gelu": _F + ", INT8, INT32, INT64", "Gemm": _F,
    "GlobalAveragePool": _F, "GlobalLpPool": _F, "GlobalMaxPool": _F, "Greater": _FI, "GreaterOrEqual": _FI,
    "GridSample": "FP32, FP16", "GroupNormalization": _F, "GRU": _F, "HammingWindow": "FP32, FP16",
    "HannWindow": "FP32, FP16", "HardSigmoid": _F, "HardSwish": _F, "Hardmax": _F, "Identity": _FIB, "If": _FIB,
    "ImageScaler": _F, "InstanceNormalization": _F, "IsInf": _F, "IsNaN": _FI, "LayerNormalization": _F,
    "LeakyRelu": _F, "Less": _FI, "LessOrEqual": _FI, "Log": _F, "LogSoftmax": _F, "Loop": _FIB, "LRN": _F,
    "LSTM": _F, "LpNormalization": _F, "LpPool": _F, "MatMul": _F, "Max": _FI, "MaxPool": _F,
    "Mean": _F + ", FP8, INT32, INT64", "MeanVarianceNormalization": _F, "Min": _FI, "Mish": "FP32, FP16",
    "Mod": _FI, "Mul": _FI, "Neg": _FI, "NonMaxSuppression": "FP32, FP16", "NonZero": "FP32, FP16", "Not": "BOOL",
    "OneHot": _FIB, "Or": "BOOL", "Pad": _FI, "ParametricSoftplus": _F, "Pow": _FI, "PRelu": _F,
    "QuantizeLinear": _F, "RandomNormal": _F, "RandomNormalLike": _F, "RandomUniform": _F,
    "RandomUniformLike": _F, "Range": _FI, "Reciprocal": _F, "ReduceL1": _FI, "ReduceL2": _FI,
    "ReduceLogSum": _FI, "ReduceLogSumExp": _FI, "ReduceMax": _FI, "ReduceMean": _FI, "ReduceMin": _FI,
    "ReduceProd": _FI, "ReduceSum": _FI, "ReduceSumSquare": _FI, "Relu": _FI, "Reshape": _FIB, "Resize": _F,
    "ReverseSequence": _FIB, "RMSNormalization": _F, "RNN": _F, "RoiAlign": "FP32, FP16", "RotaryEmbedding": _F,
    "Round": _F, "STFT": "FP32", "ScaledTanh": _F, "Scan": _F, "Scatter": _FI, "ScatterElements": _FI,
    "ScatterND": _FI, "Selu": _F, "Shape": _FIB, "Shrink": _FI, "Sigmoid": _F, "Sign": _FI, "Sin": _F,
    "Sinh": _F, "Size": _FIB, "Slice": _FIB, "Softmax": _F, "Softplus": _F, "Softsign": _F, "SpaceToDepth": _FI,
    "Split": _FIB, "Sqrt": _F, "Squeeze": _FIB, "Sub": _FI, "Sum": _FI, "Tan": _F, "Tanh": _F,
    "TensorScatter": _F + ", INT32", "ThresholdedRelu": _F, "Tile": _FIB, "TopK": _FI, "Transpose": _FIB,
    "Trilu": _FIB, "Unsqueeze": _FIB, "Upsample": _F, "Where": _FIB, "Xor": "BOOL",
}
SUPPORTED = {op: frozenset(t.strip() for t in types.split(",")) for op, types in _TABLE.items()}
# onnx.TensorProto data types by the names the table uses.
_TYPE_NAMES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 3: "INT8", 22: "INT4",
               2: "UINT8", 17: "FP8"}


def check_ops(model, plugin_domain: str) -> list[str]:
    """What in an ``onnx`` ModelProto (shapes inferred) TensorRT's parser would reject: operators outside the
    table, or whose first input has a type the table does not list; plugin nodes (``plugin_domain``) pass.
    Empty when the model is fine."""
    types = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    problems = Counter()
    for node in model.graph.node:
        if node.domain == plugin_domain:
            continue
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED:
            problems[f"{node.domain + '::' if node.domain else ''}{node.op_type} (not supported)"] += 1
            continue
        first = types.get(node.input[0]) if node.input and node.input[0] else None
        name = _TYPE_NAMES.get(first, f"type {first}") if first else None
        if name is not None and name not in SUPPORTED[node.op_type]:
            problems[f"{node.op_type} on {name}"] += 1
    return [f"{p} x{n}" for p, n in problems.items()]
