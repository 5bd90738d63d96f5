"""A mask proven key padding [+ causal] on the example inputs is checked again at every call: a rewritten
attention is exact at the covering window on the valid positions, or it raises MaskChangedError (torch,
eager and compiled) / answers NaN (ONNX Runtime), never a plausible wrong value.

The models: Mistral and Gemma3 with a sliding window of 20 and ModernBERT with local attention over 40
tokens, all traced at T=16 (the window is invisible there) and called at 12 and 16 (exact) and 24 and 40
(the window is active); a module that takes its 4-D mask as an input; nanoGPT's flash path.
"""

import onnxruntime
import pytest
import torch

import relinear as rl
from relinear.passes.attention import GUARD_OP
from tests.model_zoo import VOCAB, padded_batch
from tests.passes.attention_modules import MaskInputAttention, NanoGPTAttention, padding_mask

COVERING = rl.Recipe([rl.LinearAttention(feature_map="hedgehog", window=64)])  # covers every key used here
TRACED, BELOW, ABOVE = 16, (12, 16), (24, 40)


def _windowed_model(arch: str, attn: str):
    import transformers as tf

    common = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, max_position_embeddings=128,
                  vocab_size=VOCAB, num_hidden_layers=2, attn_implementation=attn)
    if arch == "mistral":
        model = tf.MistralModel(tf.MistralConfig(num_key_value_heads=2, sliding_window=20, use_cache=False, **common))
    elif arch == "gemma3":
        model = tf.Gemma3TextModel(tf.Gemma3TextConfig(
            num_key_value_heads=2, head_dim=16, sliding_window=20, use_cache=False,
            layer_types=["sliding_attention", "full_attention"], **common))
    else:
        model = tf.ModernBertModel(tf.ModernBertConfig(
            local_attention=40, global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            cls_token_id=1, sep_token_id=2, **common))
    return model.eval()


def _batch(arch: str, length: int, seed: int = 1):
    return padded_batch("bert" if arch == "modernbert" else "mistral", lengths=(length, length - 5),
                        generator_seed=seed)


class _Hidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize(("arch", "attn"), [("mistral", "sdpa"), ("mistral", "eager"), ("gemma3", "sdpa"),
                                            ("modernbert", "sdpa")])
def test_window_invisible_at_tracing_is_exact_below_it_and_raises_above_it(arch, attn):
    torch.manual_seed(0)
    model = _Hidden(_windowed_model(arch, attn))
    fast, report = rl.rewrite(model, _batch(arch, TRACED, seed=0), COVERING, progress=False)
    assert report.counts == {"linear_attention": 2}, report.skipped
    for length in BELOW:
        ids, mask = _batch(arch, length)
        keep = mask.bool()
        with torch.no_grad():
            torch.testing.assert_close(fast(ids, mask)[keep], model(ids, mask)[keep], rtol=1e-4, atol=1e-4)
    for length in ABOVE:
        with pytest.raises(rl.MaskChangedError, match=r"window \(sliding-window or local attention\)"), torch.no_grad():
            fast(*_batch(arch, length))


@pytest.mark.parametrize(("arch", "guards"), [("mistral", 1), ("gemma3", 2)])
def test_layers_sharing_a_mask_share_one_guard_that_names_them_all(arch, guards):
    """Mistral's two layers read one sliding-window mask: one check per call, naming both sites. Gemma3's
    sliding and full layers read two masks: two checks."""
    model = _Hidden(_windowed_model(arch, "sdpa"))
    fast, _ = rl.rewrite(model, _batch(arch, TRACED, seed=0), COVERING, progress=False)
    found = [n for n in fast.graph.nodes if n.op == "call_function" and n.target is GUARD_OP]
    assert len(found) == guards
    if guards == 1:
        assert all(f"layers.{i}.self_attn" in found[0].args[-1] for i in (0, 1))
        with pytest.raises(rl.MaskChangedError, match=r"layers\.0\.self_attn, .*layers\.1\.self_attn"), \
                torch.no_grad():
            fast(*_batch(arch, ABOVE[0]))


def test_window_visible_at_tracing_is_left_alone_with_the_reason():
    torch.manual_seed(0)
    model = _Hidden(_windowed_model("mistral", "sdpa"))
    fast, report = rl.rewrite(model, _batch("mistral", 24, seed=0), COVERING, progress=False)
    assert report.counts == {}
    assert len(report.skipped) == 2 and all("a window" in why for _, _, why in report.skipped), report.skipped
    ids, mask = _batch("mistral", 40)
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, mask), model(ids, mask))


def test_a_one_row_boolean_mask_needs_no_guard():
    """[B, 1, 1, T] is key padding by its shape: nothing to check at run time, and any such mask is exact."""
    torch.manual_seed(0)
    module = MaskInputAttention().eval()
    x = torch.randn(2, 8, 32)
    traced = padding_mask([8, 5], 8, causal=False)[:, :, -1:]
    fast, report = rl.rewrite(module, (x, traced), COVERING, progress=False)
    assert report.counts == {"linear_attention": 1}
    assert not any(n.target is GUARD_OP for n in fast.graph.nodes)
    other = padding_mask([3, 8], 8, causal=False)[:, :, -1:]
    rows = other[:, 0, 0, :, None].expand(2, 8, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, other)[rows], module(x, other)[rows], rtol=1e-5, atol=1e-5)


def _mask_module_case():
    torch.manual_seed(0)
    module = MaskInputAttention().eval()
    x = torch.randn(2, 8, 32)
    traced = padding_mask([8, 5], 8, causal=True)
    changed = padding_mask([8, 5], 8, causal=False)  # same shape, padding only: queries see later keys
    return module, x, traced, changed


def test_a_mask_input_that_changes_pattern_raises_in_torch():
    module, x, traced, changed = _mask_module_case()
    fast, report = rl.rewrite(module, (x, traced), COVERING, progress=False)
    assert report.counts == {"linear_attention": 1}
    rows = traced[:, 0, :, -1:].squeeze(-1)[:, :, None].expand(2, 8, 32)  # real queries
    with torch.no_grad():
        torch.testing.assert_close(fast(x, traced)[rows], module(x, traced)[rows], rtol=1e-5, atol=1e-5)
        with pytest.raises(rl.MaskChangedError, match="sees later keys, so the mask is not causal"):
            fast(x, changed)


def test_a_mask_input_that_changes_pattern_raises_under_torch_compile():
    module, x, traced, changed = _mask_module_case()
    compiled = torch.compile(module, backend=rl.backend(COVERING), dynamic=False)
    with torch.no_grad():
        compiled(x, traced)
        assert rl.last_report().counts == {"linear_attention": 1}
        with pytest.raises(rl.MaskChangedError, match="not causal"):
            compiled(x, changed)


def _ort(path, *args):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    return torch.from_numpy(session.run(None, feeds)[0])


def test_onnx_answers_nan_for_a_changed_mask_input(tmp_path):
    module, x, traced, changed = _mask_module_case()
    rl.export.to_onnx(module, (x, traced), tmp_path / "m.onnx", COVERING)
    rows = traced[:, 0, :, -1]
    with torch.no_grad():
        torch.testing.assert_close(_ort(tmp_path / "m.onnx", x, traced)[rows], module(x, traced)[rows],
                                   rtol=1e-4, atol=1e-4)
    assert _ort(tmp_path / "m.onnx", x, changed).isnan().all()


@pytest.mark.slow  # CI covers the ONNX guard by the mask-input module above and test_key_padding_guard.py
def test_onnx_of_a_sliding_window_model_is_exact_below_the_window_and_nan_above(tmp_path):
    torch.manual_seed(0)
    model = _Hidden(_windowed_model("mistral", "sdpa"))
    rl.export.to_onnx(model, _batch("mistral", TRACED, seed=0), tmp_path / "m.onnx", COVERING)
    ids, mask = _batch("mistral", 12)
    keep = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(_ort(tmp_path / "m.onnx", ids, mask)[keep], model(ids, mask)[keep],
                                   rtol=1e-4, atol=1e-4)
    assert _ort(tmp_path / "m.onnx", *_batch("mistral", 24)).isnan().all()


def test_nanogpt_flash_path_runs_after_rewriting_and_is_exact_at_the_covering_window():
    """SDPA's output is [B, H, T, D] stored as [B, T, H, D]; torch.export drops nanoGPT's `.contiguous()` as a
    no-op, so the following `.view` needs the replacement to keep that layout."""
    torch.manual_seed(0)
    module = NanoGPTAttention().eval()
    x = torch.randn(2, 12, 32)
    fast, report = rl.rewrite(module, (x,), COVERING, progress=False)
    assert report.counts == {"linear_attention": 1}
    with torch.no_grad():
        torch.testing.assert_close(fast(x), module(x), rtol=1e-5, atol=1e-5)
        x2 = torch.randn(3, 9, 32)
        torch.testing.assert_close(fast(x2), module(x2), rtol=1e-5, atol=1e-5)


def test_nanogpt_flash_path_through_the_backend_is_exact_at_the_covering_window():
    torch.manual_seed(0)
    module = NanoGPTAttention().eval()
    x = torch.randn(2, 12, 32)
    compiled = torch.compile(module, backend=rl.backend(COVERING), dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-5)
    assert rl.last_report().counts == {"linear_attention": 1}


@pytest.mark.slow  # the backend's guard is covered by the mask-input module's compile test
def test_backend_on_a_sliding_window_model_is_exact_below_the_window_and_raises_above_it():
    torch.manual_seed(0)
    model = _Hidden(_windowed_model("mistral", "sdpa"))
    compiled = torch.compile(model, backend=rl.backend(COVERING), dynamic=False)
    ids, mask = _batch("mistral", TRACED)
    keep = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, mask)[keep], model(ids, mask)[keep], rtol=1e-4, atol=1e-4)
        assert rl.last_report().counts == {"linear_attention": 2}
        # a second length compiles a new graph, in which the backend replays the sites decided at the first
        with pytest.raises(rl.MaskChangedError, match="a window"):
            compiled(*_batch("mistral", ABOVE[0]))
