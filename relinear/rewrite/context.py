"""What a rule sees besides the graph: the values of weights, the example activations at a site, and a
place to put new parameters and modules. Both front ends build one: the Dynamo backend (weights are
placeholders whose example inputs are the real parameters) and `rl.rewrite` (weights are `get_attr`s).
"""

from __future__ import annotations

import torch
import torch.fx as fx

HOLDER = "relinear"  # every new parameter and module lives under this submodule of the rewritten graph


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]):
        super().__init__(gm)
        self.wanted = wanted
        self.seen: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.wanted:
            self.seen[n] = out
        return out


def size_hint(value):
    """The concrete number behind a symbolic size: Dynamo's dynamic graphs take sizes as SymInt inputs, and an
    `fx.Interpreter` cannot run factory calls such as `expand(batch, s0)` on them. The hint is the size of the
    call being compiled, so example activations are recorded at that size."""
    if isinstance(value, (torch.SymInt, torch.SymBool)):
        from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw

        return guarding_hint_or_throw(value)
    if isinstance(value, torch.SymFloat):
        return float(value.node.hint)
    return value


class GraphContext:
    def __init__(self, gm: fx.GraphModule, example_inputs: list, *, seed: int = 0, trainable: bool = True,
                 holder: str = HOLDER):
        self.gm = gm
        self.example_inputs = [size_hint(v) for v in example_inputs]
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._placeholder_values = dict(zip(placeholders, self.example_inputs, strict=False))
        self._activations: dict[fx.Node, object] = {}
        self.seed = seed
        self.trainable = trainable
        self.holder_name = holder
        self._counter = 0

    # values -----------------------------------------------------------------------------------------
    def value(self, node) -> torch.Tensor | None:
        """The concrete tensor behind a weight node (get_attr or parameter placeholder), else None."""
        if not isinstance(node, fx.Node):
            return None
        if node.op == "get_attr":
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj if isinstance(obj, torch.Tensor) else None
        if node.op == "placeholder":
            v = self._placeholder_values.get(node)
            return v if isinstance(v, torch.Tensor) else None
        return None

    def is_weight(self, node) -> bool:
        """A parameter (or a constant tensor attribute), not a per-call input."""
        v = self.value(node)
        if v is None:
            return False
        return node.op == "get_attr" or isinstance(v, torch.nn.Parameter)

    def record(self, nodes) -> None:
        """Run the graph once on the example inputs, keeping the values of `nodes` (for error measurement)."""
        wanted = {n for n in nodes if isinstance(n, fx.Node) and n not in self._activations}
        if not wanted:
            return
        recorder = _Recorder(self.gm, wanted)
        with torch.no_grad():
            recorder.run(*self.example_inputs)
        self._activations.update(recorder.seen)

    def activation(self, node):
        """The example value flowing through `node`: a weight's value, a recorded activation, or a constant."""
        if not isinstance(node, fx.Node):
            return node
        v = self.value(node)
        if v is not None:
            return v
        if node not in self._activations:
            self.record([node])
        return self._activations[node]

    # rewriting --------------------------------------------------------------------------------------
    def decide_site(self, rule, m, decide):
        """The engine's one call per site: `decide()` rewrites it (budgets included) and returns (new node,
        Site) or a Skip. The compile backend's context answers from the decision an earlier graph of the same
        model made instead (`rewrite/replay.py`)."""
        return decide()

    # new state --------------------------------------------------------------------------------------
    def _holder(self) -> torch.nn.Module:
        if not hasattr(self.gm, self.holder_name):
            self.gm.add_submodule(self.holder_name, torch.nn.Module())
        return getattr(self.gm, self.holder_name)

    def fresh_name(self, stem: str) -> str:
        self._counter += 1
        return f"{stem.replace('.', '_')}_{self._counter}"

    def add_param(self, name: str, tensor: torch.Tensor) -> fx.Node:
        """Register `tensor` as a parameter (a buffer when not trainable) and return a get_attr node for it.
        Insert with `graph.inserting_before(...)` around the call."""
        value = tensor.detach().clone()
        if self.trainable:
            self._holder().register_parameter(name, torch.nn.Parameter(value, requires_grad=value.is_floating_point()))
        else:  # compile time: a constant (Dynamo's graph lists its parameters; new ones would confuse AOTAutograd)
            self._holder().register_buffer(name, value)
            self._declare_constants([f"{self.holder_name}.{name}"])
        return self.gm.graph.get_attr(f"{self.holder_name}.{name}")

    def _declare_constants(self, qualnames: list[str]) -> None:
        """AOTAutograd maps every lifted tensor of a Dynamo graph to a source: give new constants one."""
        sources = getattr(self.gm, "_param_name_to_source", None)
        if sources is None:
            return
        from torch._dynamo.source import ConstantSource

        for qualname in qualnames:
            sources[qualname] = ConstantSource(qualname)

    def adopt(self, name: str, value: torch.Tensor | torch.nn.Module) -> str:
        """Hold a tensor or module another graph already holds, not a copy (a replayed rewrite shares its
        weights with the graph that computed them); returns the qualified name for a get_attr / call_module."""
        if isinstance(value, torch.nn.Module):
            return self.add_module(name, value)
        if isinstance(value, torch.nn.Parameter):
            self._holder().register_parameter(name, value)
        else:
            self._holder().register_buffer(name, value)
            if not self.trainable:
                self._declare_constants([f"{self.holder_name}.{name}"])
        return f"{self.holder_name}.{name}"

    def add_module(self, name: str, module: torch.nn.Module) -> str:
        self._holder().add_module(name, module)
        if not self.trainable:  # compile time: its parameters become constants, as in `add_param`
            for owner in module.modules():
                for pname, param in list(owner.named_parameters(recurse=False)):
                    del owner._parameters[pname]
                    owner.register_buffer(pname, param.detach())
            self._declare_constants([f"{self.holder_name}.{name}.{b}" for b, _ in module.named_buffers()])
        return f"{self.holder_name}.{name}"

    def generator(self, site_index: int) -> torch.Generator:
        """A generator seeded by the recipe seed and the site's ordinal: equal recipes give equal weights."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + site_index)
