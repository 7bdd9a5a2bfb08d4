"""Orthogonal rotations of the residual stream and of each attention's values (QuaRot, Ashkboos et al. 2024;
SpinQuant, Liu et al. 2024) folded into the weights: an exact rewrite of the float graph.

An RMSNorm without its weight commutes with an orthogonal Q (``|xQ| = |x|``), so once every norm's weight is
folded into the matmuls that read it, the residual stream r can be carried as ``rQ``: the embedding table becomes
``E Q``, every matmul that reads a norm of it ``W diag(g) Q`` (the head included), every matmul that writes to it
``Q^T W`` (bias ``b Q``). Attention is linear in its values, so a head-dimension rotation H turns the value
projection's rows of each head into ``H^T W_v`` and the output projection's columns of each head into ``W_o H``.
The outputs are unchanged in float; the weights' columns lose their outliers (a random Hadamard matrix spreads
each over all channels), which is what a per-group grid needs.

A gated MLP's product ``act(gate) * up`` is not linear in anything a weight can absorb, so its rotation runs on the
activations (``online_pass``, QuaRot's online Hadamard): ``lowbit::rotate`` multiplies it by an orthogonal Q before
the down projection, whose weight becomes ``W Q`` (``W Q Q^T x = W x``). The product's outliers, the largest
activations of the model, are spread over all of it before per-token INT8 quantization reads them. The same
rewrite before every quantized matmul (``online_rotate = "all"``) needs nothing of the model's structure: it serves
the models the residual rotation refuses (LayerNorm, Gemma-3's norms after attention and MLP). Q has the structure
below, so the op costs m + p multiply-adds per element.

Q is ``diag(signs) (R_m ⊗ H_p)`` for ``d = m p`` with p the largest power of two dividing d: H_p Sylvester's
Hadamard matrix, R_m a random orthogonal matrix of the odd rest (1 x 1 when d is a power of two), from a fixed
seed. Where the residual stream is read or written by anything else (LayerNorm's mean subtraction, Gemma-2/3's
weighted norms on the block outputs, an encoder's hidden-state output) the pass refuses with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from lowbit.errors import LowbitError
from lowbit.ir.graph import Graph, MatmulSite, module_of
from lowbit.ir.patterns import CASTS, VIEWS, aten, attention_values, call, constant_uses, rmsnorm_parts, skip_casts

SEED = 0


@dataclass
class Plan:
    """What the rotation rewrites: the embedding's table, the norms over the residual stream with the matmuls that
    read them, the matmuls that write to it, and each attention's (value projection, output projection)."""
    embedding: str                                   # the token table's attribute
    norms: list = field(default_factory=list)        # (weight attr, offset, [reader sites])
    writers: list = field(default_factory=list)      # [MatmulSite]
    values: list = field(default_factory=list)       # [(value site, output site)]


def orthogonal_parts(n: int, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(signs [n], R_m, H_p / sqrt(p)) in float64, the factors of ``orthogonal(n)`` (see the module's docstring)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + n)
    p = n & -n
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    m = n // p
    r, tri = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    r = r * torch.sign(torch.diagonal(tri)).where(torch.diagonal(tri) != 0, torch.ones(m, dtype=torch.float64))
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
    return signs, r.contiguous(), h / math.sqrt(p)


def orthogonal(n: int, seed: int = SEED) -> torch.Tensor:
    """A random orthogonal n x n matrix in float64: ``diag(signs) (R_m ⊗ H_p)`` (see the module's docstring)."""
    signs, r, h = orthogonal_parts(n, seed)
    return signs[:, None] * torch.kron(r, h)


def _identity(n) -> bool:
    """A cast, or a dropout that is off (inference)."""
    return call(n, *CASTS, aten.type_as.default) or (call(n, aten.dropout.default) and n.args[2:3] == (False,))


def _skip(n):
    while _identity(n):
        n = n.args[0]
    return n


def _transparent(u: fx.Node, r: fx.Node) -> bool:
    """Whether ``u`` carries the residual stream ``r`` on unchanged up to a factor: a cast, an inactive dropout, or
    a product with a scalar (Gemma's embedding normalizer)."""
    if _identity(u) and u.args[0] is r:
        return True
    if call(u, aten.mul.Tensor) and r in u.args:
        other = u.args[1] if u.args[0] is r else u.args[0]
        val = other.meta.get("val") if isinstance(other, fx.Node) else other
        return isinstance(val, (int, float)) or (isinstance(val, torch.Tensor) and val.numel() == 1)
    return False


def _norm_nodes(out: fx.Node, x: fx.Node) -> set:
    """The nodes of the RMSNorm from ``x`` (casts of it included) to ``out``, its weight's constants aside."""
    inside, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n in inside or n.op in ("get_attr", "placeholder") or skip_casts(n) is x:
            continue
        inside.add(n)
        stack.extend(n.all_input_nodes)
    return inside


def _readers(out: fx.Node, made_by: dict, why: str) -> list:
    """The matmul sites reading a norm's output ``out``, through slices of the token dimensions and views that keep
    the last; anything else reading it is refused (``why`` names the norm)."""
    sites, stack = [], [out]
    while stack:
        n = stack.pop()
        for u in n.users:
            if call(u, aten._assert_tensor_metadata.default):
                continue
            site = made_by.get(u)
            if site is not None and site.input_node is n and site.in_features == out.meta["val"].shape[-1]:
                sites.append(site)
            elif call(u, aten.slice.Tensor) and u.args[1] not in (-1, n.meta["val"].dim() - 1):
                stack.append(u)
            elif call(u, *VIEWS) and u.args[1][-1] in (-1, n.meta["val"].shape[-1]):
                stack.append(u)
            else:
                raise _refuse(f"{why} is also read by {_where(u)}, which is not a matmul of the model's weights")
    return sites


def _where(n: fx.Node) -> str:
    path = module_of(n)[0]
    return f"'{n.name}'" + (f" in {path}" if path else "")


def _refuse(why: str) -> LowbitError:
    return LowbitError(f"rotations cannot be folded into this model: {why}; use a recipe without rotate")


def find_plan(graph: Graph) -> Plan:
    """The rotation's rewrite of ``graph``: follows the residual stream from the token embedding through every
    residual add to the head, refusing (LowbitError) whatever reads or writes it other than an RMSNorm that only
    matmuls read, or a matmul."""
    if graph.task != "causal-lm" or graph.input_embedding not in graph.embeddings:
        raise _refuse("only causal LMs with a token embedding are rotated (an encoder outputs its hidden states)")
    made_by = {s.node: s for s in graph.sites.values()}
    norms = {}                                       # a node inside a norm -> (norm output, its parts)
    for n in graph.gm.graph.nodes:
        parts, _ = rmsnorm_parts(n)
        if parts is not None:
            norms.update({m: (n, parts) for m in _norm_nodes(n, parts[0])})
    emb = graph.embeddings[graph.input_embedding]
    uses = constant_uses(graph.gm.graph)
    plan = Plan(emb.weight_attr)
    stream, seen_norms = [emb.node], set()
    for r in stream:
        for u in r.users:
            if call(u, aten._assert_tensor_metadata.default):
                continue
            if _transparent(u, r):
                stream.append(u)
            elif u in norms and norms[u][1][0] is skip_casts(r):
                out, (_, weight, _, path) = norms[u]
                if out in seen_norms:
                    continue
                if uses.get(weight[0].target) != 1:
                    raise _refuse(f"the norm {path or out.name} shares its weight with another op")
                seen_norms.add(out)
                plan.norms.append((weight[0].target, float(weight[1] or 0.0),
                                   _readers(out, made_by, f"the norm {path or out.name}")))
            elif call(u, aten.add.Tensor) and len(u.all_input_nodes) == 2:
                other = _skip(u.args[1] if u.args[0] is r else u.args[0])
                writer = made_by.get(other)
                if rmsnorm_parts(other)[0] is not None:
                    raise _refuse(f"the residual stream adds the norm {_where(other)} of a block's output, whose "
                                  "weight does not commute with a rotation (Gemma-2/3's norms after attention and MLP)")
                if writer is None or len(other.users) != 1 or uses.get(writer.weight_attr) != 1:
                    raise _refuse(f"the residual stream adds {_where(other)}, not the output of a matmul with a "
                                  "weight of its own that only the add reads")
                plan.writers.append(writer)
                stream.append(u)
            elif call(u, aten.layer_norm.default):
                raise _refuse(f"{_where(u)} is a LayerNorm, whose mean subtraction does not commute with a rotation "
                              "(rotations need RMSNorm models: Llama, Mistral, Qwen, Gemma)")
            else:
                raise _refuse(f"the residual stream is read by {_where(u)}, not an RMSNorm or a residual add")
    if not plan.norms or not plan.writers:
        raise _refuse("no residual stream of RMSNorms and residual adds was found")
    for site in plan.writers:
        found = attention_values(site.input_node, made_by, uses)
        if found is not None:
            plan.values.append((found[0], site))
    return plan


def _untie(graph: Graph, site: MatmulSite) -> None:
    """Give ``site`` its own copy of a weight it shares (a head tied to the embedding), stored under its name."""
    attr = "lowbit_" + site.name.replace(".", "_") + "_weight"
    graph.gm.register_buffer(attr, graph.attr(site.weight_attr).detach().clone())
    graph.tensor_names[attr] = f"{site.name}.weight"
    with graph.gm.graph.inserting_before(site.node):
        node = graph.gm.graph.get_attr(attr)
    old = next(a for a in site.node.all_input_nodes if a.op == "get_attr" and a.target == site.weight_attr)
    site.node.replace_input_with(old, node)
    site.weight_attr = attr
    graph.gm.recompile()


def _untie_shared(graph: Graph, sites: list[MatmulSite]) -> list[str]:
    """``_untie`` each of ``sites`` whose weight another op also reads (a head tied to the embedding), so turning its
    columns leaves the other's alone; returns their names."""
    uses = constant_uses(graph.gm.graph)
    shared = [site for site in sites if uses.get(site.weight_attr, 0) > 1]
    for site in shared:
        _untie(graph, site)
    return [site.name for site in shared]


def _set(graph: Graph, attr: str, value: torch.Tensor) -> None:
    graph.set_constant(attr, value.to(graph.attr(attr).dtype))


def _rotate_columns(graph: Graph, site: MatmulSite, m: torch.Tensor) -> None:
    """W <- W m (the input side), in float64."""
    w = graph.weight(site).double() @ m
    _set(graph, site.weight_attr, w.t() if site.weight_is_kn else w)


def _rotate_rows(graph: Graph, site: MatmulSite, m: torch.Tensor) -> None:
    """W <- m^T W and b <- b m (the output side), in float64."""
    w = m.t() @ graph.weight(site).double()
    _set(graph, site.weight_attr, w.t() if site.weight_is_kn else w)
    if site.bias_attr is not None:
        _set(graph, site.bias_attr, graph.bias(site).double() @ m)


def apply_plan(graph: Graph, plan: Plan, q: torch.Tensor) -> list:
    """Rotate the residual stream by ``q`` [d, d] and each attention's values by a head-dimension rotation; returns
    the matmuls given their own copy of a weight they shared (a head tied to the embedding)."""
    untied = _untie_shared(graph, [s for _, _, sites in plan.norms for s in sites])
    _set(graph, plan.embedding, graph.attr(plan.embedding).detach().double() @ q)
    for weight, offset, sites in plan.norms:
        g = graph.attr(weight).detach().double() + offset
        for site in sites:
            _rotate_columns(graph, site, g[:, None] * q)         # W diag(g) Q
        _set(graph, weight, torch.full_like(g, 1.0 - offset))
    for site in plan.writers:
        _rotate_rows(graph, site, q)
    for v, o in plan.values:
        dim = int(o.input_node.args[0].meta["val"].shape[-1])
        h = orthogonal(dim, SEED + 1)
        _rotate_rows(graph, v, torch.block_diag(*[h] * (v.out_features // dim)))
        _rotate_columns(graph, o, torch.block_diag(*[h] * (o.in_features // dim)))
    return untied


def down_projections(graph: Graph) -> list[MatmulSite]:
    """The matmuls that read an elementwise product of two activations (through casts): a gated MLP's
    ``act(gate) * up``, or a GELU written as a product (BLOOM, GPT-J). Where the online rotation goes: the MLP's
    largest activations. The rewrite is exact for any matmul; these are the ones it is for."""
    out = []
    for site in graph.sites.values():
        x = skip_casts(site.input_node)
        if call(x, aten.mul.Tensor) and all(isinstance(a, fx.Node) and a.op != "get_attr" for a in x.args[:2]):
            out.append(site)
    return out


def online_sites(graph: Graph, recipe) -> list[MatmulSite]:
    """The matmuls whose inputs ``recipe.online_rotate`` rotates: "down", the ``down_projections``; "all", every one
    the recipe quantizes. Refused (one line, before any pass) when there is none."""
    from lowbit.passes.rtn import quantizable

    if recipe.online_rotate == "all":
        sites = [site for site, _ in quantizable(graph, recipe)]
        if not sites:
            raise LowbitError("online_rotate = \"all\" rotates the inputs of the quantized matmuls; this recipe "
                              "quantizes none of this model's")
        return sites
    sites = down_projections(graph)
    if not sites:
        raise LowbitError("online_rotate = \"down\" rotates an MLP's elementwise product (a gated MLP's act(gate) * "
                          "up) before the matmul that reads it; this model has none; use online_rotate = \"all\"")
    return sites


def _constant(graph: Graph, attr: str, stored: str, value: torch.Tensor) -> str:
    """Register ``value`` once as the constant ``attr``, stored under ``stored``."""
    if attr not in graph.gm._buffers:
        graph.gm.register_buffer(attr, value.to(graph.dtype).contiguous())
        graph.tensor_names[attr] = stored
    return attr


def _rotate_input(graph: Graph, sites: list[MatmulSite]) -> None:
    """``x -> lowbit::rotate(x)`` for the matmuls ``sites`` that read x, and each weight ``W -> W Q``; the same Q for
    every input width."""
    k, x = sites[0].in_features, sites[0].input_node
    signs, r, h = orthogonal_parts(k, SEED + 2)
    attrs = [_constant(graph, f"lowbit_online_{part}_{k}", f"lowbit.online_rotation.{k}.{part}", t)
             for part, t in (("signs", signs), ("left", r.t()), ("right", h))]
    with graph.gm.graph.inserting_before(sites[0].node):
        rotated = graph.gm.graph.call_function(torch.ops.lowbit.rotate.default,
                                               (x, *(graph.gm.graph.get_attr(a) for a in attrs)))
    if "val" in x.meta:
        rotated.meta["val"] = x.meta["val"]
    q = signs[:, None] * torch.kron(r, h)
    for site in sites:
        site.node.replace_input_with(x, rotated)
        _rotate_columns(graph, site, q)


def online_pass(graph: Graph, recipe) -> dict:
    """Rotate the inputs of the recipe's ``online_sites`` at run time, one rotation per input the matmuls share
    (Q/K/V, gate/up); exact in float, checked on the logits of 32 random token ids. Returns what was rotated."""
    from lowbit.passes.exact import check_unchanged

    sites = online_sites(graph, recipe)
    by_input: dict[fx.Node, list[MatmulSite]] = {}
    for site in sites:
        by_input.setdefault(site.input_node, []).append(site)
    probe = torch.randint(0, graph.vocab_size, (1, 32), generator=torch.Generator().manual_seed(SEED))
    before = check_unchanged(graph, probe)
    _untie_shared(graph, sites)                   # a quantized head tied to the embedding: only the head turns
    for sites in by_input.values():
        _rotate_input(graph, sites)
    graph.gm.recompile()
    diff = check_unchanged(graph, probe, before, "online rotation")
    return {"which": recipe.online_rotate, "matmuls": sum(map(len, by_input.values())), "rotations": len(by_input),
            "dims": sorted({s.in_features for sites in by_input.values() for s in sites}), "max_rel_diff": diff}


def rotate_pass(graph: Graph) -> dict:
    """Rotate ``graph`` in place (exact in float: checked on its logits for 32 random token ids); returns what was
    rotated."""
    from lowbit.passes.exact import check_unchanged

    plan = find_plan(graph)
    probe = torch.randint(0, graph.vocab_size, (1, 32), generator=torch.Generator().manual_seed(SEED))
    d = int(graph.attr(plan.embedding).shape[-1])
    before = check_unchanged(graph, probe)
    untied = apply_plan(graph, plan, orthogonal(d))
    diff = check_unchanged(graph, probe, before, "rotation")
    return {"dim": d, "norms": len(plan.norms), "writers": len(plan.writers), "values": len(plan.values),
            "untied": untied, "max_rel_diff": diff}
