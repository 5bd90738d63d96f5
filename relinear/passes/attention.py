"""Softmax attention -> linear attention (and the sliding-window hybrid), wherever it is written.

Two matchers feed one rewrite:
- `F.scaled_dot_product_attention` (and its ATen overload), read argument by argument;
- hand-written attention: `softmax(q @ k^T * scale + mask) @ v` with the spellings transformers and users
  write (transpose / permute / .mT / einsum, scale by mul or div before or after the product, additive masks,
  masked_fill, where, a float32 softmax with a cast back, dropout that is off). The matcher walks up from
  the final product; every step is a small pattern, so a new spelling is one more alternative.
Both produce the same captures: q, k, v, mask (+ how it applies), causal flag, scale. The rewrite proves
the mask is key padding (+ causal) on the example inputs, then calls a `LinearizedAttention` submodule; unless
the mask's shape proves it for every input, the graph checks it again at every call (`key_padding_guard`).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from relinear.approx.linear_attention import LinearizedAttention
from relinear.passes.attention_masks import expand_keys, explain_mask, key_mask_from, needs_guard
from relinear.recipe import LinearAttention
from relinear.rewrite.context import GraphContext
from relinear.rewrite.engine import Rule, Skip, site_of
from relinear.rewrite.ops import arg, canonical
from relinear.rewrite.pattern import Match
from relinear.rewrite.report import Site, relative_error

GUARD_OP = torch.ops.relinear.key_padding_guard.default
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def merge_mask_guards(graph: fx.Graph) -> None:
    """One guard per mask: the layers of a model share one mask tensor, and checking it costs several passes
    over [B, H, Tq, Tk] (at 4096 tokens most of a rewritten Llama's time outside its matmuls). Guards on the same
    mask node with the same flags ask the same question, so the first answers for all, naming every site. (Each
    site inserts its own guard first: the backend replays a site from the nodes it inserted.)"""
    first: dict[tuple, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not GUARD_OP:
            continue
        *question, sites = node.args
        kept = first.setdefault(tuple(question), node)
        if kept is not node:
            kept.args = (*question, f"{kept.args[-1]}, {sites}")
            node.replace_all_uses_with(kept)
            graph.erase_node(node)


def _ndim(node) -> int | None:
    val = node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def match_sdpa(node: fx.Node, ctx: GraphContext) -> Match | None:
    if canonical(node) != "sdpa":
        return None
    vals = [arg(node, i, name) for i, name in enumerate(SDPA_ARGS)]
    q, k, v, mask, dropout_p, is_causal, scale, _gqa = vals
    m = Match(root=node, captures={"q": q, "k": k, "v": v, "mask": mask, "out": node,
                                   "mask_kind": "bool" if mask is not None else None,
                                   "is_causal": bool(is_causal), "scale": scale, "dropout": dropout_p or 0.0})
    if mask is not None and _is_float_mask(mask):
        m.captures["mask_kind"] = "additive"
    return m


def _is_float_mask(mask) -> bool:
    val = mask.meta.get("val", mask.meta.get("example_value")) if isinstance(mask, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_floating_point()


# --- hand-written attention ---------------------------------------------------------------------------

def _strip(node, *ops):
    """Follow single-input wrappers (casts, no-op dropouts, contiguous) upward; return the first other node
    and the wrappers passed through."""
    passed = []
    while isinstance(node, fx.Node) and canonical(node) in ops:
        passed.append(node)
        node = node.args[0]
    return node, passed


def _const_factor(node) -> tuple[object, float, list]:
    """Peel mul/div by Python numbers: (inner node, accumulated factor, peeled nodes)."""
    factor, peeled = 1.0, []
    while isinstance(node, fx.Node) and canonical(node) in ("mul", "div") and len(node.args) == 2:
        a, b = node.args
        if canonical(node) == "mul" and isinstance(a, (int, float)) and not isinstance(a, bool):
            a, b = b, a
        if not isinstance(b, (int, float)) or isinstance(b, bool):
            break
        factor = factor * b if canonical(node) == "mul" else factor / b
        peeled.append(node)
        node = a
    return node, factor, peeled


def _key_transposed(node) -> tuple[object, list] | None:
    """k from k^T spelled as transpose(-2, -1), .mT, or permute swapping the last two dims."""
    op = canonical(node)
    if op == "mT":
        return node.args[0], [node]
    if op == "transpose":
        nd = _ndim(node)
        dims = {d % nd if nd else d for d in node.args[1:3]}
        if nd and dims == {nd - 2, nd - 1}:
            return node.args[0], [node]
    if op == "permute":
        perm = list(node.args[1]) if isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
        nd = len(perm)
        if perm == [*range(nd - 2), nd - 1, nd - 2]:
            return node.args[0], [node]
    return None


def _scores(node) -> tuple[dict, list] | None:
    """q @ k^T with constant factors on either side: captures q, k, scale and the interior nodes."""
    inner, factor, interior = _const_factor(node)
    if canonical(inner) == "einsum":
        spec = inner.args[0].replace(" ", "")
        operands = inner.args[1:] if len(inner.args) > 2 else inner.args[1]
        lhs, out = spec.split("->")
        a, b = lhs.split(",")
        # ...qd,...kd->...qk : contraction over the last letter of both, output keeps q then k
        if len(operands) == 2 and a[-1] == b[-1] and out == a[:-1] + b[-2] and a[:-2] == b[:-2]:
            q, fq, pq = _const_factor(operands[0])
            k, fk, pk = _const_factor(operands[1])
            return {"q": q, "k": k, "scale": factor * fq * fk}, [*interior, inner, *pq, *pk]
        return None
    if canonical(inner) != "matmul":
        return None
    q, fq, pq = _const_factor(inner.args[0])
    kt, fk, pk = _const_factor(inner.args[1])
    unt = _key_transposed(kt) if isinstance(kt, fx.Node) else None
    if unt is None:
        return None
    k, pt = unt
    return {"q": q, "k": k, "scale": factor * fq * fk}, [*interior, inner, *pq, *pk, *pt]


def _baddbmm_scores(node) -> tuple[dict, list, list] | None:
    """baddbmm(bias, q, k^T, beta=, alpha=) = beta * bias + alpha * q @ k^T on flattened heads."""
    bias, q, kt = node.args[:3]
    beta, alpha = arg(node, 3, "beta", 1), arg(node, 4, "alpha", 1)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (beta, alpha)):
        return None
    unt = _key_transposed(kt) if isinstance(kt, fx.Node) else None
    if unt is None or beta not in (0, 1):
        return None
    q, fq, pq = _const_factor(q)
    terms = [bias] if beta == 1 and isinstance(bias, fx.Node) else []  # beta = 0 ignores the (empty) bias
    return {"q": q, "k": unt[0], "scale": alpha * fq}, terms, [node, *pq, *unt[1]]


def _additive(node) -> tuple[dict, list, list] | None:
    """scores + term + term ...: (score captures, additive terms, interior). T5 adds a position bias and a mask."""
    if _folds(node, into=4) is not None:  # flattened-head scores viewed as [B, H, Tq, Tk] (to add a 4-D mask)
        found = _additive(node.args[0])
        if found is None or found[1]:
            return None
        cap, terms, interior = found
        heads = {name: _unflattened(cap[name]) for name in ("q", "k")}
        if None in heads.values():
            return None
        return {**cap, **heads}, terms, [node, *interior]
    found = _scores(node)
    if found is not None:
        return found[0], [], found[1]
    if canonical(node) == "baddbmm" and len(node.args) >= 3:
        return _baddbmm_scores(node)
    if canonical(node) == "add" and len(node.args) == 2:
        for scores, term in (node.args, tuple(reversed(node.args))):
            inner = _additive(scores) if isinstance(term, fx.Node) else None
            if inner is not None:
                cap, terms, interior = inner
                return cap, [*terms, term], [node, *interior]
    return None


_DROPPING_FILL = -1e4  # a fill at or below this drops the key (transformers uses finfo.min, nanoGPT -inf)


def _fill_value(fill, ctx: GraphContext) -> tuple[float | None, list]:
    """The constant a masked position is filled with, and the call nodes that make it: a number,
    `full_like(scores, c)`, `torch.tensor(c)` (a lifted constant in torch.export graphs)."""
    made = []
    while isinstance(fill, fx.Node) and canonical(fill) in ("lift_fresh_copy", "detach", "detach_", "to"):
        made.append(fill)
        fill = fill.args[0]
    if isinstance(fill, fx.Node) and canonical(fill) in ("full_like", "tensor") and len(fill.args) >= 1:
        made.append(fill)
        fill = fill.args[1] if canonical(fill) == "full_like" else fill.args[0]
    elif isinstance(fill, fx.Node):  # a constant of the module, never a per-call input (its value may change)
        value = ctx.value(fill) if fill.op == "get_attr" else None
        fill = value.item() if value is not None and value.numel() == 1 else None
    if isinstance(fill, (int, float)) and not isinstance(fill, bool):
        return float(fill), made
    return None, []


def _masked(node, ctx: GraphContext) -> tuple[dict | None, list]:
    """Peel the masks off the scores: masked_fills (any number: padding, then causal), one where, or additive
    terms. Returns (captures, interior); None when the masks are mixed kinds that cannot be summed."""
    fills, interior, kind = [], [], None
    while canonical(node) in ("masked_fill", "where") and len(node.args) == 3:
        if canonical(node) == "masked_fill":
            scores, mask, fill = node.args
            this = "fill"
        else:
            mask, scores, fill = node.args
            this = "keep"
        value, made = _fill_value(fill, ctx)
        # drop masks are summed (a logical or): several fills combine, several keeps would not
        if value is None or value > _DROPPING_FILL or (kind is not None and (kind != this or this == "keep")):
            return None, []
        fills.append(mask)
        interior += [node, *made]
        kind, node = this, scores
    found = _additive(node)
    if found is None:
        return None, []
    cap, terms, inner = found
    interior += inner
    if fills and terms:
        return None, []
    if fills:
        return {**cap, "mask": fills[0] if len(fills) == 1 else tuple(fills), "mask_kind": kind}, interior
    if not terms:
        return {**cap, "mask": None, "mask_kind": None}, interior
    return {**cap, "mask": terms[0] if len(terms) == 1 else tuple(terms), "mask_kind": "additive"}, interior


def _product(node) -> tuple[fx.Node, object] | None:
    """probs @ v, spelled matmul / bmm or einsum('...ij,...jd->...id')."""
    if canonical(node) == "matmul" and len(node.args) == 2:
        return node.args
    if canonical(node) == "einsum":
        operands = node.args[1:] if len(node.args) > 2 else node.args[1]
        lhs, _, out = node.args[0].replace(" ", "").partition("->")
        sides = lhs.split(",")
        if len(operands) == 2 and len(sides) == 2:
            a, b = sides
            # a = ...ij, b = ...jd, out = ...id: a contraction over the keys
            if len(a) >= 2 and a[:-2] == b[:-2] and a[-1] == b[-2] and out == a[:-1] + b[-1] and a[-1] != b[-1]:
                return operands[0], operands[1]
    return None


def _shape(node):
    val = node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same(a, b) -> bool:
    return statically_known_true(a == b)


def _folds(node, into: int) -> fx.Node | None:
    """`node` is a view between [B, H, T, X] and [B * H, T, X] (either way round: `into` is its output's rank):
    its input, else None."""
    if canonical(node) != "view":
        return None
    out, src = _shape(node), _shape(node.args[0])
    if out is None or src is None or {len(out), len(src)} != {3, 4} or len(out) != into:
        return None
    four, three = (out, src) if len(out) == 4 else (src, out)
    if _same(four[0] * four[1], three[0]) and _same(four[2], three[1]) and _same(four[3], three[2]):
        return node.args[0]
    return None


def _unflattened(node):
    """[B * H, T, X] made by a view of [B, H, T, X]: that 4-D tensor (None when there is none)."""
    return _folds(node, into=3)


def _heads_folded_product(node: fx.Node):
    """view([B * H, Tq, Dv] -> [B, H, Tq, Dv]) of bmm(view(softmax [B, H, Tq, Tk]), v [B * H, Tk, Dv]): the
    product on 4-D heads as (probs, v [B, H, Tk, Dv], interior). OPT / BART / GPT-2's upcast path."""
    flat = _folds(node, into=4)
    product = _product(flat) if flat is not None else None
    if product is None:
        return None
    probs, v = product
    probs4, v4 = _unflattened(probs), _unflattened(v)
    if probs4 is None or v4 is None:
        return None
    return probs4, v4, [flat, probs]


def match_handwritten(node: fx.Node, ctx: GraphContext) -> Match | None:
    folded = _heads_folded_product(node)
    product = _product(node) if folded is None else folded[:2]
    if product is None:
        return None
    probs, v = product
    probs, wrappers = _strip(probs, "to", "dropout", "contiguous")
    wrappers += folded[2] if folded else []
    if canonical(probs) != "softmax":
        return None
    dropout = [w for w in wrappers if canonical(w) == "dropout"]
    dim = arg(probs, 1, "dim")
    nd = _ndim(probs)
    if dim is None or not (dim == -1 or (nd is not None and dim == nd - 1)):
        return None
    scores, casts = _strip(probs.args[0], "to")
    cap, interior = _masked(scores, ctx)
    if cap is None:
        return None
    m = Match(root=node, interior=[*wrappers, probs, *casts, *interior])
    m.captures.update(cap, v=v, out=node, is_causal=False, dropout=_dropout_p(dropout))
    return m


def match_unexplained(node: fx.Node, ctx: GraphContext) -> Match | None:
    """Softmax attention that `match_handwritten` does not take (probabilities @ v over softmax(scores, -1)):
    matched only to be left alone with the reason, so that no attention goes unreported."""
    product = _product(node)
    if product is None or match_handwritten(node, ctx) is not None:
        return None
    if any(match_handwritten(user, ctx) is not None for user in node.users):  # the inner bmm of a folded product
        return None
    probs, wrappers = _strip(product[0], "to", "dropout", "contiguous", "view")
    dim = arg(probs, 1, "dim") if canonical(probs) == "softmax" else None
    nd = _ndim(probs)
    if dim is None or not (dim == -1 or (nd is not None and dim == nd - 1)):
        return None
    reshaped = any(canonical(w) == "view" for w in wrappers)
    return Match(root=node, captures={"scores": probs.args[0], "reshaped": reshaped})


_SCORE_CHANGES = {  # ops between q @ k^T and the softmax that linear attention cannot reproduce, and why
    "tanh": "logit softcapping (tanh of the scores) changes every weight",
    "gather": "disentangled / relative-position scores (a gathered score term)",
    "baddbmm": "a bias added inside baddbmm that is not a key-padding mask",
}


def explain_unmatched(m: Match, ctx: GraphContext) -> str:
    """Why the scores under this softmax are not q @ k^T * scale + a mask: the first op in them that says so."""
    seen, pending = [], [m["scores"]]
    while pending and len(seen) < 256:
        node = pending.pop(0)  # nearest first: the op that changes the scores, before the mask's making
        if not isinstance(node, fx.Node) or node.op != "call_function":
            continue
        op = canonical(node)
        if op in _SCORE_CHANGES:
            return f"not rewritten: {_SCORE_CHANGES[op]}; linear attention cannot be exact"
        seen.append(op)
        pending.extend(a for a in node.all_input_nodes if canonical(a) not in ("linear", "matmul"))  # not q's past
    if m["reshaped"]:
        return "not rewritten: the probabilities are reshaped between the softmax and the product with v " \
               "(heads folded into the batch there only)"
    ops = ", ".join(list(dict.fromkeys(o for o in seen if o))[:6])
    return f"not rewritten: the softmax scores are not q @ k^T * scale + a mask (they are built with {ops})"


def _dropout_p(dropouts: list[fx.Node]) -> float:
    """The largest dropout probability that is active (training=True) among the wrappers."""
    worst = 0.0
    for d in dropouts:
        p = arg(d, 1, "p", 0.5)
        training = arg(d, 2, "train" if isinstance(d.target, torch._ops.OpOverload) else "training", True)
        if training:
            worst = max(worst, p if isinstance(p, (int, float)) else 1.0)
    return worst


# --- the rewrite ----------------------------------------------------------------------------------------

def _check(m: Match, ctx: GraphContext) -> str | None:
    dropout = m["dropout"]
    if not isinstance(dropout, (int, float)) or dropout > 0:
        return f"dropout p={dropout} is active (training): the rewrite would change the distribution"
    scale = m.get("scale")
    if scale is not None and not isinstance(scale, (int, float)):
        return "the scale is computed at run time: its value cannot be proven"
    for name in ("q", "k", "v"):
        if _ndim(m[name]) not in (3, 4, None):
            return f"{name} is {_ndim(m[name])}-D: expected [batch, heads, tokens, dim] or flattened [batch * heads, " \
                   "tokens, dim]"
    return None


def _with_head_axis(x: torch.Tensor) -> torch.Tensor:
    """Flattened heads [B * H, T, X] -> [B * H, 1, T, X]: each (batch, head) row is a batch of one head.

    Masks get the same treatment so that a [B * H, Tq, Tk] mask keeps its rows aligned with q's.
    """
    return x.unsqueeze(1) if x.dim() == 3 else x


def _dim_order(x: torch.Tensor) -> list[int]:
    """x's dims from outermost to innermost in memory: [0, 1, ..., n - 1] when contiguous."""
    return sorted(range(x.dim()), key=lambda i: (-x.stride(i), i))


def in_layout(x: torch.Tensor, order: list[int]) -> torch.Tensor:
    """x with the memory layout `order` (outermost dim first). The graph after an attention may rely on its
    output's layout: SDPA returns [B, H, T, D] stored as [B, T, H, D], so `out.transpose(1, 2).view(B, T, C)`
    works, and torch.export drops the `.contiguous()` in between as a no-op."""
    inverse = [order.index(i) for i in range(len(order))]
    return x.permute(order).contiguous().permute(inverse)


def _decay_detail(decay: bool | int) -> str:
    return "" if not decay else ", decay" if decay == 1 else f", decay x{decay}"


def _make_rewrite(cfg: LinearAttention):
    def rewrite(m: Match, ctx: GraphContext):
        q, k, v = (ctx.activation(m[n]) for n in ("q", "k", "v"))
        mask_node = m.get("mask")
        terms = mask_node if isinstance(mask_node, tuple) else (mask_node,) if mask_node is not None else ()
        mask = sum(ctx.activation(t) for t in terms) if terms else None
        flat = q.dim() == 3
        if flat != (k.dim() == 3) or flat != (v.dim() == 3):
            return Skip(f"q, k, v have {q.dim()}, {k.dim()}, {v.dim()} dims: heads flattened in some only")
        if flat:
            q, k, v = (_with_head_axis(x) for x in (q, k, v))
            mask = _with_head_axis(mask) if mask is not None else None
        b, h, tq, d = q.shape
        if h % k.shape[1]:
            return Skip(f"{h} query heads are not a multiple of {k.shape[1]} key heads")
        causal, reason = explain_mask(mask, m.get("mask_kind"), m["is_causal"], q, k)
        if reason:
            return Skip(reason)
        if cfg.gate == "liger" and not causal:
            return Skip("gate='liger' is causal only and this attention is bidirectional")
        scale = m.get("scale")
        scale = 1 / math.sqrt(d) if scale is None else float(scale)
        index = sum(1 for s in ctx.gm.modules() if isinstance(s, LinearizedAttention))
        module = LinearizedAttention(h, d, feature_map=cfg.feature_map, window=cfg.window, gate=cfg.gate,
                                     feature_dim=cfg.feature_dim, chunk_size=cfg.chunk_size, sinks=cfg.sinks,
                                     balance=cfg.balance, decay=cfg.decay,
                                     generator=ctx.generator(index)).to(q.dtype)
        with torch.no_grad():
            keys = key_mask_from(mask, m["mask_kind"], q) if mask is not None else None
            approx = module(q, k, v, key_mask=keys, causal=causal, scale=scale)
            approx_layout = approx.squeeze(1) if flat else approx
            layout = _dim_order(ctx.activation(m["out"]))
            exact = _with_head_axis(ctx.activation(m["out"]))
            if keys is not None and tq <= k.shape[-2]:  # padded queries' outputs are meaningless: not compared
                real = keys[:, k.shape[-2] - tq:][:, None, :, None].expand_as(exact)
                approx, exact = approx[real], exact[real]
            err = relative_error(approx, exact)
        if cfg.max_error is not None and err > cfg.max_error:
            return Skip(f"relative error {err:.3g} > max_error={cfg.max_error}")
        graph = ctx.gm.graph
        where = site_of(m.root)
        target = ctx.add_module(ctx.fresh_name(f"attn_{where}"), module)
        with graph.inserting_before(m.root):
            lift = (lambda node: graph.call_function(_with_head_axis, (node,))) if flat else (lambda node: node)
            key_mask, poison = None, None
            if terms:
                total = terms[0]
                combine = operator.or_ if m["mask_kind"] == "fill" else operator.add  # ONNX has no Add on bools
                for term in terms[1:]:
                    total = graph.call_function(combine, (total, term))
                if needs_guard(mask.shape, m["mask_kind"]):
                    # one guard per site here, as the backend replays a site from the nodes it inserted;
                    # merge_mask_guards leaves one per mask once every site is decided
                    guard = graph.call_function(GUARD_OP, (lift(total), m["mask_kind"], causal, m["is_causal"], where))
                    keys, poison = (graph.call_function(operator.getitem, (guard, i)) for i in (0, 1))
                    key_mask = graph.call_function(expand_keys, (keys, lift(m["q"])))
                else:
                    key_mask = graph.call_function(key_mask_from, (lift(total), m["mask_kind"], lift(m["q"])))
            new = graph.call_module(target, (lift(m["q"]), lift(m["k"]), lift(m["v"])),
                                    {"key_mask": key_mask, "causal": causal, "scale": scale})
            # the call names its site even when nodes follow it (a guard's poison, a layout): rl.generate reads it
            new.meta["nn_module_stack"] = m.root.meta.get("nn_module_stack", {})
            if flat:
                new = graph.call_function(torch.squeeze, (new, 1))
            if poison is not None:  # 0, or NaN where the ONNX lowering of a violated guard cannot raise
                new = graph.call_function(operator.add, (new, poison))
            if layout != _dim_order(approx_layout):
                new = graph.call_function(in_layout, (new, layout))
        tk, dv = k.shape[-2], v.shape[-1]
        feat = module.feature_map_q.out_dim
        n_params = sum(t.numel() for t in (*module.parameters(), *module.buffers()))  # the backend made them buffers
        flops_before = 2 * b * h * tq * tk * (d + dv)
        exact_keys = min(cfg.window + cfg.sinks, tk) if cfg.window else 0
        copies = max(int(cfg.decay), 1)  # each decay rate is one more linear attention per head
        flops_after = 2 * b * h * copies * (tq + tk) * feat * (dv + 1) + (2 * b * h * tq * exact_keys * (d + dv))
        detail = f"{cfg.feature_map}" + (f", window={cfg.window}" if cfg.window else "") + \
                 (f", sinks={cfg.sinks}" if cfg.sinks else "") + _decay_detail(cfg.decay) + \
                 (f", gate={cfg.gate}" if cfg.gate else "") + (", causal" if causal else "") + \
                 (", heads flattened: one feature map for all" if flat else "") + \
                 (", mask checked at every call" if poison is not None else "")
        return new, Site(cfg.name, where, 0, n_params, flops_before, flops_after, err, detail)

    return rewrite


def attention_rules(cfg: LinearAttention) -> list[Rule]:
    rewrite = _make_rewrite(cfg)
    needs = ("q", "k", "v", "mask", "out")
    return [
        Rule(cfg.name, match_sdpa, rewrite, check=_check, select=cfg.selects, needs=needs, finish=merge_mask_guards),
        Rule(cfg.name, match_handwritten, rewrite, check=_check, select=cfg.selects, needs=needs,
             finish=merge_mask_guards),
        Rule(cfg.name, match_unexplained, rewrite, check=explain_unmatched, select=cfg.selects),
    ]
