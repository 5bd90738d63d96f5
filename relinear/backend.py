"""The torch.compile backend: `torch.compile(model, backend="relinear", options={"recipe": recipe})`.

Dynamo hands over parameters as placeholders whose example inputs are the real `nn.Parameter`s, so the new
weights are computed here, at compile time, and enter the graph as constants. Their holder's name carries the
recipe's fingerprint: a changed recipe changes the graph's code, so no compile cache can return a stale artifact.

One model reaches the backend as several graphs (a recompile when a size changes, graph breaks, failed guards).
Example activations are recorded at the size of the call being compiled (`context.size_hint`), and each site
is decided once per model and recipe, by the first graph that rewrites it; later graphs replay that decision
with the same weights (`rewrite/replay.py`). A graph compiled with gradients on refuses backward through the
sites whose weights it froze (`frozen.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import torch
from torch.utils.weak import WeakIdKeyDictionary

from relinear.frozen import guard
from relinear.recipe import Recipe
from relinear.rewrite.engine import apply_rules, site_of
from relinear.rewrite.pattern import Match
from relinear.rewrite.replay import ReplayContext
from relinear.rewrite.report import RewriteReport


@dataclasses.dataclass
class GraphReport(RewriteReport):
    """The report of one graph the backend rewrote, and where that graph stands among all of them."""

    graphs: int = 0  # graphs the backend has rewritten in this process, this one included (it is the latest)
    compile_id: str | None = None  # Dynamo's id: "frame/compile", e.g. "0/1" for the recompile of frame 0
    replayed: int = 0  # sites decided by an earlier graph of the same model and recipe, replayed here

    def to_dict(self) -> dict:
        return {**super().to_dict(), "graphs": self.graphs, "compile_id": self.compile_id,
                "replayed": self.replayed}

    def __rich__(self):
        from rich.console import Group

        replayed = f"; {self.replayed} site(s) replayed from an earlier graph" if self.replayed else ""
        return Group(f"relinear backend: graph {self.graphs} (Dynamo compile {self.compile_id}){replayed}",
                     super().__rich__())


_reports: list[GraphReport] = []
# first parameter of a graph -> {(Dynamo frame, recipe, parameters of the graph): {site: Decision}}; weak, so a
# model's decisions (and the weights they hold) go when the model does
_decisions: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _decisions_for(example_inputs: list, fingerprint: str, frame) -> dict:
    params = [v for v in example_inputs if isinstance(v, torch.nn.Parameter)]
    if not params:
        return {}  # nothing identifies the model: this graph decides alone
    by_graph = _decisions.setdefault(params[0], {})
    return by_graph.setdefault((frame, fingerprint, tuple(id(p) for p in params)), {})


def relinear_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    from torch._inductor.compile_fx import compile_fx

    options = dict(options or {})
    recipe = options.pop("recipe", None)
    if options:
        raise ValueError(f"relinear backend: unknown option(s) {sorted(options)} (known: 'recipe')")
    if recipe is not None:
        if not isinstance(recipe, Recipe):
            raise TypeError("relinear backend: options['recipe'] must be a relinear.Recipe, "
                            f"got {type(recipe).__name__}")
        _reports.append(_rewrite(gm, example_inputs, recipe))
    return compile_fx(gm, example_inputs)


def _rewrite(gm: torch.fx.GraphModule, example_inputs, recipe: Recipe) -> GraphReport:
    from torch._guards import CompileContext

    from relinear.passes import rules_for
    from relinear.rewrite.inline import expand_opaque_calls

    expand_opaque_calls(gm)  # nn.MultiheadAttention: the ops torch.export sees, so the same rules fire
    compile_id = CompileContext.current_compile_id()
    frame = None if compile_id is None else compile_id.frame_id
    fingerprint = recipe.fingerprint()
    # training: a backward would reach parameters (a backward for the inputs alone trains nothing)
    training = torch.is_grad_enabled() and any(isinstance(v, torch.nn.Parameter) and v.requires_grad
                                               for v in example_inputs)
    ctx = _BackendContext(gm, example_inputs, seed=recipe.seed, trainable=False, holder=f"relinear_{fingerprint}",
                          decisions=_decisions_for(list(example_inputs), fingerprint, frame), training=training)
    report = apply_rules(gm, rules_for(recipe), ctx, progress=False)
    return GraphReport(report.sites, report.skipped, graphs=len(_reports) + 1,
                       compile_id=None if compile_id is None else str(compile_id), replayed=ctx.replayed)


class _BackendContext(ReplayContext):
    """Replays earlier graphs' decisions; when the graph is compiled for training, guards every site that
    holds new weights so that backward through it raises (`frozen.py`)."""

    def __init__(self, *args, training: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.training = training

    def decide_site(self, rule, m: Match, decide):
        result = super().decide_site(rule, m, decide)
        if not (self.training and isinstance(result, tuple) and self._holds_weights(self.inserted)):
            return result
        new_node, site = result
        inputs = _trained_inputs(m, self)
        return (guard(self.gm.graph, new_node, inputs, site_of(m.root)) if inputs else new_node), site

    def _holds_weights(self, nodes: list[torch.fx.Node]) -> bool:
        """Whether these nodes read a floating-point tensor of the holder: weights rl.rewrite would train."""
        for n in nodes:
            if n.op not in ("get_attr", "call_module"):
                continue
            held = operator.attrgetter(n.target)(self.gm)
            values = held.buffers() if isinstance(held, torch.nn.Module) else [held]
            if any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in values):
                return True
        return False


def _trained_inputs(m: Match, ctx: ReplayContext) -> list[torch.fx.Node]:
    """What a backward through the site would train: the weights it replaces that require grad; at a site that
    replaces none (attention, whose new feature maps and gates rl.rewrite would train), its activations."""
    inside = {m.root, *m.interior}
    outside = [item for value in m.captures.values() for item in (value if isinstance(value, tuple) else (value,))
               if isinstance(item, torch.fx.Node) and item not in inside]
    weights = [n for n in outside if ctx.is_weight(n)]
    if weights:
        found = [n for n in weights if ctx.value(n).requires_grad]
    else:
        found = [n for n in outside if isinstance(n.meta.get("example_value"), torch.Tensor)
                 and n.meta["example_value"].is_floating_point()]
    return list(dict.fromkeys(found))


def backend(recipe: Recipe):
    """A backend callable bound to `recipe`: `torch.compile(model, backend=rl.backend(recipe))`."""
    return functools.partial(relinear_backend, options={"recipe": recipe})


def reports() -> list[GraphReport]:
    """The reports of every graph the backend rewrote in this process, oldest first."""
    return list(_reports)


def last_report() -> GraphReport | None:
    """The report of the latest graph the backend rewrote; `.graphs` says how many it has rewritten, and
    `rl.reports()` lists them all (Dynamo compiles one model into several graphs)."""
    return _reports[-1] if _reports else None
