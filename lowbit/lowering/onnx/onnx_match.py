"""Reading an ``onnx_ir`` graph for the rewrite rules (``ort_attention.py``, ``ort_gelu.py``): which op made a
value, a value's constant, a node's int-list attribute, a value's users of one op type."""

from __future__ import annotations

CONTRIB = "com.microsoft"


def producer(value, op_type: str):
    """The node of type ``op_type`` (ONNX domain) that produces ``value``, or None."""
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def const_array(value):
    """``value``'s constant as a numpy array, or None."""
    return value.const_value.numpy() if value is not None and value.const_value is not None else None


def ints_attr(node, name: str):
    attr = node.attributes.get(name)
    return list(attr.value) if attr is not None else None


def users(value, op_type: str) -> list:
    return [use.node for use in value.uses() if use.node.op_type == op_type]
