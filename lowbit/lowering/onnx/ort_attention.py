"""The attention block of a causal LM as ONNX Runtime's ``GroupQueryAttention``: a rewrite rule on the exported
ONNX graph (``onnx_fusions.fuse_for_ort`` runs it).

It matches, per layer, what the exported program computes from the Q/K/V projections to the attention output::

    q, k, v = Split(matmul)  |  three matmuls            [B, S, H*D], [B, S, Hkv*D], [B, S, Hkv*D]
    q, k    = Transpose(Reshape(.))  [B, H, S, D]; rotary: x * cos + Concat(-x[D/2:], x[:D/2]) * sin,
              cos / sin = Cos / Sin(Concat(f, f)) with f = position_ids * inv_freq (a constant)
    present = Concat(past, k) and Concat(past, v)        (graph outputs present.{i}.key / .value)
    out     = Softmax(Where(mask, q @ present_k^T * scale, MIN)) @ present_v     (lowering.onnx attention)

and writes one ``com.microsoft::GroupQueryAttention`` (rotary inside, ``do_rotary=1``) fed the projections (the
packed Q/K/V matmul's output when there is one), the past cache, and inputs derived once from
``attention_mask``:

- ``seqlens_k`` = total length - 1 for every row and ``total_sequence_length``: every cache slot, left padding
  included, is a slot GroupQueryAttention counts;
- ``attention_bias`` [B, 1, S, T]: 0 on real tokens, the most negative float32 on padding (not -inf: a padding
  query's row stays finite);
- ``cos_cache`` / ``sin_cache`` [max positions, D/2]: the model's ``inv_freq`` constant times each position.

Positions are the cache slot: GroupQueryAttention rotates the first prompt by slot and decodes at slot T-1,
ignoring ``position_ids``. A left-padded row is then rotated ``pad`` positions further than transformers rotates
it, for its queries and keys alike; rotary attention depends only on the distance between the two, so the result
is the same (to float32 rounding). ``position_ids`` stays an input of the graph, unused. A runtime that moves a
row's cache to other slots (continuous batching) rotates its keys by the move: the manifest records the one
``inv_freq`` every layer shares as ``slot_rotary``.

The caller gates the rule on the model (``plain_causal``): the mask must be causal plus padding, nothing else
(no sliding window, no chunked attention), since GroupQueryAttention rebuilds that mask from the lengths instead
of reading the graph's. A layer that does not match in every detail keeps its plain ops. ONNX Runtime's CPU
kernel needs a head size that is a multiple of 16, and ``S > 1`` with a past cache only at batch 1 (lowbit's
runtimes prefill from an empty cache, then decode one token at a time).
"""

from __future__ import annotations

import numpy as np

from lowbit.lowering.onnx.onnx_match import CONTRIB, const_array, ints_attr, producer, users

MASKED_SCORE = float(np.finfo(np.float32).min)


def plain_causal(config) -> bool:
    """Whether a transformers config's attention mask is causal + padding only: no sliding window, no chunked
    attention, no per-layer attention types but full attention."""
    if getattr(config, "attention_chunk_size", None):
        return False
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return False
    window = getattr(config, "sliding_window", None)
    return not (window and getattr(config, "use_sliding_window", True))


def _heads_split(value):
    """[B, S, n] -> Transpose(Reshape(.), 0 2 1 3): the flat projection, or None."""
    t = producer(value, "Transpose")
    if t is None or ints_attr(t, "perm") != [0, 2, 1, 3]:
        return None
    r = producer(t.inputs[0], "Reshape")
    return r.inputs[0] if r is not None else None


def _half_rotated(cat, x, half: int) -> bool:
    """``cat`` is Concat(-x[..., half:], x[..., :half]) on the last axis."""
    node = producer(cat, "Concat")
    if node is None or node.attributes.get_int("axis") not in (-1, 3) or len(node.inputs) != 2:
        return False
    neg = producer(node.inputs[0], "Neg")
    hi, lo = (producer(neg.inputs[0], "Slice") if neg else None), producer(node.inputs[1], "Slice")
    if hi is None or lo is None or hi.inputs[0] is not x or lo.inputs[0] is not x:
        return False

    def bounds(s):
        starts, ends = const_array(s.inputs[1]), const_array(s.inputs[2])
        axes = const_array(s.inputs[3]) if len(s.inputs) > 3 else None
        steps = const_array(s.inputs[4]) if len(s.inputs) > 4 else None
        if starts is None or ends is None or (axes is not None and list(axes.ravel()) not in ([-1], [3])) or \
                (steps is not None and list(steps.ravel()) != [1]):
            return None
        return int(starts.ravel()[0]), int(ends.ravel()[0])

    b_hi, b_lo = bounds(hi), bounds(lo)
    return b_lo == (0, half) and b_hi is not None and b_hi[0] == half and b_hi[1] >= 2 * half


def _trig(value, fn: str):
    """Unsqueeze(fn(Concat(f, f)), 1) -> f, or None."""
    u = producer(value, "Unsqueeze")
    if u is None or [int(a) for a in (const_array(u.inputs[1]) if len(u.inputs) > 1 else [])] != [1]:
        return None
    t = producer(u.inputs[0], fn)
    cat = producer(t.inputs[0], "Concat") if t is not None else None
    if cat is None or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]:
        return None
    return cat.inputs[0]


def _rotary(value):
    """x * cos + rotate_half(x) * sin -> (x, freqs), freqs the value both Cos and Sin read; or None."""
    add = producer(value, "Add")
    if add is None:
        return None
    for a, b in (add.inputs, add.inputs[::-1]):
        m1, m2 = producer(a, "Mul"), producer(b, "Mul")
        if m1 is None or m2 is None:
            continue
        for x, cos in (m1.inputs, m1.inputs[::-1]):
            f = _trig(cos, "Cos")
            for rot, sin in (m2.inputs, m2.inputs[::-1]):
                if f is not None and _trig(sin, "Sin") is f and x.shape is not None and \
                        isinstance(x.shape[-1], int) and _half_rotated(rot, x, x.shape[-1] // 2):
                    return x, f
    return None


def _inv_freq(freqs, position_ids):
    """freqs = Cast(Unsqueeze(position_ids)) * inv_freq -> inv_freq as a flat float32 array, or None."""
    mul = producer(freqs, "Mul")
    if mul is None:
        return None
    for pos, c in (mul.inputs, mul.inputs[::-1]):
        inv = const_array(c)
        node = pos.producer()
        while node is not None and node.op_type in ("Cast", "Unsqueeze"):
            pos = node.inputs[0]
            node = pos.producer()
        if inv is not None and pos is position_ids:
            return inv.astype(np.float32).ravel()
    return None


class _Attention:
    """The plain ops of one layer's attention, as ``_match`` found them."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _match(graph, layer: int, inputs: dict, outputs: dict, kv_heads: int):
    """One layer's attention, or the reason it does not match."""
    pk, pv = outputs.get(f"present.{layer}.key"), outputs.get(f"present.{layer}.value")
    ck, cv = producer(pk, "Concat"), producer(pv, "Concat")
    if ck is None or cv is None or ck.inputs[0] is not inputs.get(f"past_key_values.{layer}.key") or \
            cv.inputs[0] is not inputs.get(f"past_key_values.{layer}.value"):
        return "the cache is not Concat(past, new)"
    rk = _rotary(ck.inputs[1])
    if rk is None:
        return "no rotary embedding on the keys (partial or scaled rotary, or none)"
    k_heads, freqs = rk
    k_flat, v_flat = _heads_split(k_heads), _heads_split(cv.inputs[1])
    if k_flat is None or v_flat is None:
        return "keys / values are not a reshape of a projection"
    inv = _inv_freq(freqs, inputs.get("position_ids"))
    if inv is None:
        return "the rotary angles are not position_ids * inv_freq"
    head = 2 * inv.size
    # The attention reading the cache: [Unsqueeze] -> Transpose -> MatMul(q, .) -> Mul(scale) -> Where -> Softmax
    # -> MatMul(., [Unsqueeze] v) -> [Reshape] -> Transpose(0 2 1 3).
    grouped = bool(users(pk, "Unsqueeze"))
    kt_src = users(pk, "Unsqueeze")[0].outputs[0] if grouped else pk
    tr = users(kt_src, "Transpose")
    if len(tr) != 1:
        return "no attention reads the key cache"
    mm = users(tr[0].outputs[0], "MatMul")
    scale_mul = users(mm[0].outputs[0], "Mul") if len(mm) == 1 else []
    where = users(scale_mul[0].outputs[0], "Where") if len(scale_mul) == 1 else []
    softmax = users(where[0].outputs[0], "Softmax") if len(where) == 1 else []
    pv_mm = users(softmax[0].outputs[0], "MatMul") if len(softmax) == 1 else []
    if len(pv_mm) != 1:
        return "the attention is not MatMul -> scale -> Where(mask) -> Softmax -> MatMul"
    scale = const_array(next((v for v in scale_mul[0].inputs if v is not mm[0].outputs[0]), None))
    if scale is None or scale.size != 1 or where[0].inputs[1] is not scale_mul[0].outputs[0]:
        return "the attention's scale is not a constant"
    v_src = pv_mm[0].inputs[1]
    if (producer(v_src, "Unsqueeze").inputs[0] if grouped and producer(v_src, "Unsqueeze") else v_src) is not pv:
        return "the attention does not read the value cache"
    q_rot = mm[0].inputs[0]
    if grouped:
        q_rot = producer(q_rot, "Reshape").inputs[0] if producer(q_rot, "Reshape") else None
    rq = _rotary(q_rot) if q_rot is not None else None
    if rq is None or rq[1] is not freqs:
        return "no rotary embedding on the queries with the keys' angles"
    q_flat = _heads_split(rq[0])
    out = pv_mm[0].outputs[0]
    if grouped:
        out = next((u.outputs[0] for u in users(out, "Reshape")), None)
    final = next((u for u in users(out, "Transpose") if ints_attr(u, "perm") == [0, 2, 1, 3]), None) if out else None
    if q_flat is None or final is None:
        return "the queries or the output are not laid out as [B, S, H, D]"
    q_size, k_size, v_size = (v.shape[-1] if v.shape is not None else None for v in (q_flat, k_flat, v_flat))
    if not all(isinstance(n, int) for n in (q_size, k_size, v_size)) or k_size != kv_heads * head or \
            v_size != k_size or q_size % (kv_heads * head):
        return "the projections' widths do not give whole heads"
    if head % 16:
        return f"head size {head} (ONNX Runtime's CPU GroupQueryAttention needs a multiple of 16)"
    return _Attention(q=q_flat, k=k_flat, v=v_flat, past_k=ck.inputs[0], past_v=cv.inputs[0], present_k=pk,
                      present_v=pv, out=final.outputs[0], heads=q_size // head, kv_heads=kv_heads, head=head,
                      scale=float(scale.ravel()[0]), inv_freq=inv, anchor=final)


def _packed(a: _Attention):
    """The Q/K/V matmul's output when q, k and v are the three parts of one Split of it."""
    split = producer(a.q, "Split")
    if split is None or list(split.outputs) != [a.q, a.k, a.v] or split.attributes.get_int("axis") not in (-1, 2):
        return None
    sizes = const_array(split.inputs[1]) if len(split.inputs) > 1 else None
    n = a.heads * a.head
    if sizes is None or [int(s) for s in sizes] != [n, a.kv_heads * a.head, a.kv_heads * a.head]:
        return None
    return split.inputs[0]


def fuse_group_query_attention(model, kv_heads: list[int], max_positions: int) -> tuple[int, list[str]]:
    """Rewrite every matching layer in place; (layers fused, one reason per layer left as plain ops)."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}
    found, skipped = [], []
    for layer, hkv in enumerate(kv_heads):
        m = _match(graph, layer, inputs, outputs, hkv)
        (skipped.append(f"layer {layer}: {m}") if isinstance(m, str) else found.append(m))
    if not found:
        return 0, skipped

    def const(name: str, array) -> ir.Value:
        if f"gqa_{name}" not in graph.initializers:
            graph.register_initializer(ir.Value(name=f"gqa_{name}", const_value=ir.tensor(np.asarray(array))))
        return graph.initializers[f"gqa_{name}"]

    # Inputs shared by every layer, computed once at the top of the graph from attention_mask and input_ids.
    mask, ids = inputs["attention_mask"], inputs["input_ids"]
    shared: list = []

    def add(op_type, ins, domain="", **attrs):
        node = ir.Node(domain, op_type, ins, [ir.Attr(k, _attr_type(v), v) for k, v in attrs.items()])
        shared.append(node)
        return node.outputs[0]

    batch = add("Shape", [mask], start=0, end=1)
    total = add("Shape", [mask], start=1, end=2)
    seq = add("Shape", [ids], start=1, end=2)
    one = const("one", np.array([1], np.int64))
    seqlens = add("Cast", [add("Expand", [add("Sub", [total, one]), batch])], to=int(ir.DataType.INT32))
    total32 = add("Cast", [add("Squeeze", [total, const("axis0", np.array([0], np.int64))])], to=int(ir.DataType.INT32))
    padding = add("Equal", [add("Unsqueeze", [mask, const("axes12", np.array([1, 2], np.int64))]),
                            const("zero", np.array(0, np.int64))])
    bias = add("Where", [padding, const("masked", np.array(MASKED_SCORE, np.float32)),
                         const("open", np.array(0.0, np.float32))])
    bias = add("Expand", [bias, add("Concat", [batch, one, seq, total], axis=0)])
    graph.insert_before(next(iter(graph)), shared)

    caches: dict = {}
    for a in found:
        key = a.inv_freq.tobytes()
        if key not in caches:
            angles = np.arange(max_positions, dtype=np.float32)[:, None] * a.inv_freq[None, :]
            caches[key] = (const(f"cos_cache{len(caches)}", np.cos(angles).astype(np.float32)),
                           const(f"sin_cache{len(caches)}", np.sin(angles).astype(np.float32)))
        cos, sin = caches[key]
        graph.meta["gqa_inv_freq"] = a.inv_freq if len(caches) == 1 else None
        packed = _packed(a)
        qkv = [packed, None, None] if packed is not None else [a.q, a.k, a.v]
        gqa = ir.Node(CONTRIB, "GroupQueryAttention",
                      [*qkv, a.past_k, a.past_v, seqlens, total32, cos, sin, None, bias],
                      [ir.AttrInt64("num_heads", a.heads), ir.AttrInt64("kv_num_heads", a.kv_heads),
                       ir.AttrInt64("do_rotary", 1), ir.AttrFloat32("scale", a.scale)], num_outputs=3)
        graph.insert_before(a.anchor, [gqa])
        # The output projection reads [B, S, H*D], what GroupQueryAttention returns: its Reshape goes too.
        for use in list(a.out.uses()):
            flat = use.node.outputs[0]
            if use.node.op_type == "Reshape" and flat.shape is not None and len(flat.shape) == 3 and \
                    flat.shape[-1] == a.heads * a.head:
                ir.convenience.replace_all_uses_with(flat, gqa.outputs[0])
        if a.out.uses():
            heads = ir.Node("", "Reshape", [gqa.outputs[0], const(f"bshd{a.heads}_{a.head}",
                                                                   np.array([0, 0, a.heads, a.head], np.int64))])
            graph.insert_after(gqa, [heads])
            ir.convenience.replace_all_uses_with(a.out, heads.outputs[0])
        for old, new in ((a.present_k, gqa.outputs[1]), (a.present_v, gqa.outputs[2])):
            name, old.name = old.name, f"{old.name}_unfused"
            graph.outputs[list(graph.outputs).index(old)] = new
            new.name, new.type, new.shape = name, old.type, old.shape
    RemoveUnusedNodesPass()(model)
    return len(found), skipped


def _attr_type(v):
    import onnx_ir as ir

    return ir.AttributeType.INT if isinstance(v, int) else ir.AttributeType.FLOAT
