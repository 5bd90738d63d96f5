"""Text generation from a rewritten decoder with a recurrent state instead of a KV cache.

`rl.rewrite` turns a decoder's softmax attention into `LinearizedAttention` calls inside one graph. Generating
from that graph by re-running it on the growing sequence costs O(T) per token; here the same graph runs on the
prompt once (prefill), then on one token at a time, while each attention site keeps what `step` needs: a
running state of fixed size for linear and decaying attention, the last `window` keys (+ `sinks`) for the
hybrid. Everything else in the graph (projections, dense rewrites, norms, the LM head) is the rewritten model's
own computation, so the tokens are those of the rewritten model, only cheaper.

The graph must take `position_ids` (rotary and learned positions of a left-padded batch must follow the
attention mask, and a single-token call cannot infer them), so rewrite with
`example_kwargs={"attention_mask": mask, "position_ids": rl.positions(mask)}`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn

from relinear.approx.linear_attention import DecodeCache, LinearizedAttention
from relinear.passes.attention import match_handwritten, match_sdpa
from relinear.rewrite.engine import site_of

# Inputs the decoder fills in itself; other inputs of the graph come from the caller (see RecurrentDecoder).
_TOKENS, _MASK, _POSITIONS = "input_ids", "attention_mask", "position_ids"
# Defaults for inputs the graph may take, when the caller gives none: `logits_to_keep=1` computes the LM head
# for the last position only (the one generation reads); `use_cache=False` is the only value torch.export
# traces (a transformers KV cache is no pytree), and the state replaces that cache anyway.
_DEFAULT_INPUTS = {"logits_to_keep": 1, "use_cache": False}


class GenerationError(ValueError):
    """The model cannot generate with a recurrent state; the message says why and what to do."""


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] that follow the attention mask [B, T] (1 = token, 0 = padding): each row counts its
    own tokens from 0, padding gets 0. What transformers' `generate` computes for a left-padded batch."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _nbytes(value) -> int:
    """Bytes of every tensor in a (nested) dataclass / tuple of tensors."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if dataclasses.is_dataclass(value):
        return sum(_nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


@dataclasses.dataclass
class RecurrentState:
    """What generation carries between tokens: one `DecodeCache` per attention site (keyed by the module path of
    the original model's attention, e.g. ``model.layers.0.self_attn``) and the position of each row's next
    token [B]. Its size does not depend on the context length (window + sinks slots for the hybrid)."""

    caches: dict[str, DecodeCache]
    next_position: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes held by the attention caches: the counterpart of a KV cache's size."""
        return sum(_nbytes(cache) for cache in self.caches.values())


class _StatefulAttention(nn.Module):
    """Stands in for one `LinearizedAttention` call of the graph during generation: on the prompt it runs the
    module's causal forward (the very computation of the rewritten model) and keeps the cache it leaves; on
    later tokens it steps from that cache. The module itself is shared, not copied: calibrated weights count."""

    def __init__(self, attention: LinearizedAttention, site: str):
        super().__init__()
        self.attention = attention
        self.site = site
        self.state: RecurrentState | None = None
        self.prompt_mask: torch.Tensor | None = None  # [B, T] bool during prefill

    def forward(self, q, k, v, key_mask=None, causal=False, scale=None):
        caches = self.state.caches
        if self.site not in caches:
            self._check_keys(key_mask)
            caches[self.site] = self.attention.prefill_cache(k, v, key_mask, scale)
            return self.attention(q, k, v, key_mask=key_mask, causal=causal, scale=scale)
        cache, outs = caches[self.site], []
        for t in range(q.shape[2]):
            out, cache = self.attention.step(q[:, :, t], k[:, :, t], v[:, :, t], cache,
                                             None if key_mask is None else key_mask[:, t], scale)
            outs.append(out)
        caches[self.site] = cache
        return torch.stack(outs, dim=2)

    def _check_keys(self, key_mask: torch.Tensor | None) -> None:
        """The graph's key mask on the prompt must be the prompt's padding: a mask that drops more (a sliding
        window, which the rewrite read as padding on its shorter example) has no recurrent form."""
        if key_mask is None or self.prompt_mask is None:
            return
        batch, length = self.prompt_mask.shape
        if not torch.equal(key_mask.reshape(batch, -1, length), self.prompt_mask[:, None].expand(batch, -1, length)):
            raise GenerationError(
                f"attention at {self.site} masks prompt tokens that are not padding (a sliding window shorter "
                f"than the {length}-token prompt?): the state path keeps every token, so it would not compute "
                "what the rewritten model computes")


def _softmax_attention_left(gm: fx.GraphModule) -> list[str]:
    """Sites of the graph that still compute softmax attention: on a single token they would see only that
    token, so generation with a state would be silently wrong there."""
    return [site_of(node) for node in gm.graph.nodes
            if node.op == "call_function" and (match_sdpa(node, None) or match_handwritten(node, None))]


def _attention_calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [node for node in gm.graph.nodes
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), LinearizedAttention)]


class RecurrentDecoder:
    """Prefill and single-token steps of a decoder rewritten by `rl.rewrite`, with a recurrent state.

    `fast` is the rewritten graph of a causal LM (its output has `.logits`, or is the logits tensor, or a tuple
    that starts with them), traced with `input_ids`, `position_ids` and, for padded batches, `attention_mask`.
    `inputs` are further inputs of the graph passed unchanged on every call (`logits_to_keep` defaults to 1 and
    `use_cache` to False). Refuses graphs where some attention was not rewritten, or was rewritten as
    bidirectional, or where one attention module is called at several places (one state each is needed).
    """

    def __init__(self, fast: nn.Module, **inputs):
        if not isinstance(fast, fx.GraphModule):
            raise GenerationError(f"expected the graph module that rl.rewrite returns, got {type(fast).__name__}")
        calls = _attention_calls(fast)
        if not calls:
            raise GenerationError("the model has no rewritten attention (no LinearizedAttention in its graph): "
                                  "rewrite it with rl.LinearAttention(...) in the recipe first")
        left = _softmax_attention_left(fast)
        if left:
            raise GenerationError(f"softmax attention was not rewritten at {', '.join(left)} (see the rewrite "
                                  "report's skipped sites): a recurrent state cannot replace its KV cache. A site "
                                  "skipped as not faster on the short example: rewrite with "
                                  "rl.LinearAttention(..., min_speedup=0), the gain is per token at long context")
        shared = sorted({n.target for n in calls if sum(m.target == n.target for m in calls) > 1})
        if shared:
            raise GenerationError(f"{', '.join(shared)} called at several places of the graph: each call needs a "
                                  "state of its own")
        bidirectional = [site_of(n) for n in calls if n.kwargs.get("causal") is not True]
        if bidirectional:
            raise GenerationError(f"attention at {', '.join(bidirectional)} is bidirectional (not causal): "
                                  "only a causal decoder generates token by token")
        self.inputs = list(inspect.signature(fast.forward).parameters)
        missing = [name for name in (_TOKENS, _POSITIONS) if name not in self.inputs]
        if missing:
            raise GenerationError(
                f"the rewritten graph does not take {' or '.join(missing)} (it takes {', '.join(self.inputs)}): "
                f"rewrite it with example_kwargs={{'attention_mask': mask, 'position_ids': rl.positions(mask)}} "
                "so that each generated token gets its own position")
        self.constants = {**{k: v for k, v in _DEFAULT_INPUTS.items() if k in self.inputs}, **inputs}
        unknown = [name for name in self.inputs if name not in (_TOKENS, _MASK, _POSITIONS, *self.constants)]
        if unknown:
            raise GenerationError(f"the rewritten graph also takes {', '.join(unknown)}: pass the values it was "
                                  "traced with as keyword arguments")
        # A second graph module over the same graph: it shares every submodule and parameter with `fast`, but
        # calls `_StatefulAttention`s where `fast` calls its LinearizedAttentions. `fast` is left untouched.
        self._gm = fx.GraphModule(fast, fast.graph)
        self._sites: list[_StatefulAttention] = []
        for node in calls:
            owner, _, name = node.target.rpartition(".")
            wrapper = _StatefulAttention(fast.get_submodule(node.target), site_of(node))
            setattr(self._gm.get_submodule(owner) if owner else self._gm, name, wrapper)
            self._sites.append(wrapper)

    @property
    def sites(self) -> list[str]:
        """The attention sites that keep a state: module paths of the original model's attention modules."""
        return [site.site for site in self._sites]

    def _run(self, state: RecurrentState, input_ids, attention_mask, position_ids) -> torch.Tensor:
        kwargs = {_POSITIONS: position_ids, **self.constants}
        if _MASK in self.inputs:
            kwargs[_MASK] = attention_mask
        elif not bool(attention_mask.bool().all()):
            raise GenerationError("the prompt is padded but the rewritten graph takes no attention_mask: rewrite "
                                  "it with example_kwargs={'attention_mask': mask, ...}")
        for site in self._sites:
            site.state, site.prompt_mask = state, attention_mask.bool()
        try:
            out = self._gm(input_ids, **kwargs)
        finally:
            for site in self._sites:
                site.state = site.prompt_mask = None
        logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
        return logits[:, -1]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, RecurrentState]:
        """Runs the prompt input_ids [B, T] (left padded where attention_mask [B, T] is 0) through the graph
        once. Returns (logits of the last position [B, V], the state to step from)."""
        if input_ids.dim() != 2:
            raise GenerationError(f"input_ids must be [batch, tokens], got {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise GenerationError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                                  f"{tuple(input_ids.shape)}")
        if not bool(attention_mask[:, -1].bool().all()):
            raise GenerationError("the prompt must be left padded (every row's last token real): a right-padded "
                                  "row would continue after its padding")
        state = RecurrentState(caches={}, next_position=attention_mask.long().sum(-1))
        logits = self._run(state, input_ids, attention_mask, positions(attention_mask))
        return logits, state

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """Feeds one token per row (tokens [B]) after the prompt or the previous step; updates `state` in place
        and returns the next logits [B, V]. Its cost does not grow with the context."""
        ids = tokens.view(-1, 1)
        logits = self._run(state, ids, torch.ones_like(ids), state.next_position.view(-1, 1))
        state.next_position = state.next_position + 1
        return logits


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row: logits [B, V] -> [B]."""
    return logits.argmax(-1)


@torch.no_grad()
def generate(
    fast: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    choose: Callable[[torch.Tensor], torch.Tensor] = greedy,
    **inputs,
) -> torch.Tensor:
    """Generation from a decoder rewritten by `rl.rewrite`, with a recurrent state (see `RecurrentDecoder`).

    input_ids [B, T] left padded where attention_mask [B, T] is 0. Returns [B, T + n] (n <= max_new_tokens):
    the prompt followed by the tokens `choose` picks from the rewritten model's next-token logits [B, V]
    (greedy: the argmax; pass a sampler for sampling), as repeated full forwards of `fast` over the growing
    sequence would give them. A row that produced `eos_token_id` continues with `pad_token_id` (default: eos)
    until every row has; `inputs` go to the graph unchanged.
    """
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    decoder = RecurrentDecoder(fast, **inputs)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    if max_new_tokens == 0:
        return input_ids
    out = [input_ids]
    logits, state = decoder.prefill(input_ids, attention_mask)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        token = choose(logits)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, pad), token)
            done = done | (token == eos_token_id)
        out.append(token[:, None])
        if i + 1 == max_new_tokens or bool(done.all()):
            break
        logits = decoder.step(token, state)
    return torch.cat(out, dim=1)
