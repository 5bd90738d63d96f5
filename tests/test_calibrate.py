"""Calibration: attention transfer lowers the error it trains on, the result saves and loads, bad calls say why."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.optim.optimizer import register_optimizer_step_post_hook

import relinear as rl
from relinear.calibrate import attention_layers, softmax_attention
from tests.model_zoo import make_model, padded_batch


def _setup(arch="bert", cfg=None):
    model = make_model(arch, "sdpa")
    ids, mask = padded_batch(arch, lengths=(16, 11))
    recipe = rl.Recipe([cfg or rl.LinearAttention(feature_map="hedgehog")])
    fast, _ = rl.rewrite(model, (ids, mask), recipe, progress=False)  # BertModel(input_ids, attention_mask)
    batches = [padded_batch(arch, lengths=(16, 11), generator_seed=s) for s in range(4)]
    return model, fast, ids, mask, batches


def _error(model, fast, ids, mask):
    keep = mask.bool()
    with torch.no_grad():
        a = model(ids, attention_mask=mask).last_hidden_state[keep]
        b = fast(ids, mask).last_hidden_state[keep]
    return float((a - b).norm() / a.norm())


def test_softmax_target_matches_sdpa_with_masks_and_gqa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    keys = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    got = softmax_attention(q, k, v, keys, causal=True, scale=0.3)
    allowed = keys[:, None, None, :] & torch.ones(6, 6, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed, scale=0.3)
    rows = allowed.any(-1, keepdim=True)  # rows that see nothing give zeros instead of NaN
    torch.testing.assert_close(got, torch.where(rows, want, torch.zeros_like(want)))
    assert (got[1, :, :2] == 0).all()


@pytest.mark.parametrize("cfg", [rl.LinearAttention(feature_map="hedgehog"),
                                 rl.LinearAttention(feature_map="elu", window=4),
                                 rl.LinearAttention(feature_map="hedgehog", decay=True),
                                 rl.LinearAttention(feature_map="hedgehog", decay=2)],
                         ids=["hedgehog", "elu+window", "hedgehog+decay", "hedgehog+decay2"])
def test_attention_transfer_reduces_loss_and_output_error(cfg):
    model, fast, ids, mask, batches = _setup(cfg=cfg)
    before = _error(model, fast, ids, mask)
    history = rl.calibrate(fast, teacher=model, batches=batches, steps=40, lr=1e-2, progress=False)
    assert len(history) == 40
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5
    assert _error(model, fast, ids, mask) < before
    # only the rewritten attention trained: every original weight is untouched
    original = dict(model.named_parameters())
    for name, p in fast.named_parameters():
        if name in original:
            torch.testing.assert_close(p, original[name])


def test_distillation_stage_runs_and_needs_a_teacher():
    model, fast, ids, mask, batches = _setup()
    history = rl.calibrate(fast, teacher=model, batches=batches, steps=3, distill_steps=3, progress=False)
    assert len(history) == 6 and all(h == h for h in history)
    with pytest.raises(ValueError, match="teacher"):
        rl.calibrate(fast, batches=batches, steps=1, distill_steps=1, progress=False)


def test_tuning_trains_a_copy_of_the_named_weights_and_never_the_teacher():
    model, fast, ids, mask, batches = _setup()
    teacher_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = rl.calibrate(fast, teacher=model, batches=batches, steps=20, lr=1e-2, distill_steps=40,
                           tune="*attention.self*", tune_lr=1e-3, progress=False)
    assert sum(history[-5:]) / 5 < sum(history[20:25]) / 5  # the distillation loss fell
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, teacher_before[name])  # the teacher is still the original
    student = dict(fast.named_parameters())
    changed = {n for n, p in teacher_before.items() if not torch.equal(student[n], p)}
    assert changed == {n for n in teacher_before if ".attention.self." in n}


def test_feature_maps_keep_training_when_tune_matches_them_too():
    model, fast, _, _, batches = _setup()
    layer = attention_layers(fast)[0]
    start = layer.feature_map_q.weight.detach().clone()
    rl.calibrate(fast, teacher=model, batches=batches, steps=0, lr=1e-2, distill_steps=3, tune="*", tune_lr=0.0,
                 progress=False)  # at tune_lr = 0 only the feature maps' own rate `lr` can move them
    assert not torch.equal(attention_layers(fast)[0].feature_map_q.weight, start)


def test_tune_needs_distillation_and_a_pattern_that_matches():
    model, fast, _, _, batches = _setup()
    with pytest.raises(ValueError, match="distill_steps"):
        rl.calibrate(fast, teacher=model, batches=batches, steps=1, tune="*query*", progress=False)
    with pytest.raises(ValueError, match="'nothing_like_this'"):
        rl.calibrate(fast, teacher=model, batches=batches, steps=1, distill_steps=1, tune=["*query*",
                     "nothing_like_this"], progress=False)


@pytest.mark.parametrize("tune", [(), "*attention*"], ids=["feature_maps", "tuned_weights"])
def test_calibrated_model_saves_and_loads(tmp_path, tune):
    model, fast, ids, mask, batches = _setup()
    rl.calibrate(fast, teacher=model, batches=batches, steps=5, lr=1e-2, distill_steps=3 if tune else 0,
                 tune=tune, tune_lr=1e-2, progress=False)
    save_file({k: v.contiguous() for k, v in fast.state_dict().items()}, tmp_path / "student.safetensors")
    _, fresh, *_ = _setup()
    fresh.load_state_dict(load_file(tmp_path / "student.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, mask).last_hidden_state,
                                   fast(ids, mask).last_hidden_state)


def test_calibrate_refuses_a_model_with_nothing_rewritten():
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no rewritten attention and no rewritten dense layer"):
        rl.calibrate(lin, teacher=lin, batches=[(torch.randn(2, 4),)], steps=1, distill_steps=1)


def _steps_moved(schedule, steps=30):
    """How far the first feature map's weight moved in each calibration step."""
    _, fast, _, _, batches = _setup()
    weight = attention_layers(fast)[0].feature_map_q.weight
    seen = [weight.detach().clone()]
    hook = register_optimizer_step_post_hook(lambda *_: seen.append(weight.detach().clone()))
    try:
        rl.calibrate(fast, batches=batches, steps=steps, lr=1e-2, schedule=schedule, progress=False)
    finally:
        hook.remove()
    return [float((b - a).abs().max()) for a, b in zip(seen, seen[1:], strict=False)]


def test_cosine_schedule_shrinks_the_last_steps_and_constant_does_not():
    # Adam moves a weight by about lr per step, so the size of each step tracks the rate
    cosine, constant = _steps_moved("cosine"), _steps_moved("constant")
    assert max(cosine[-3:]) < 0.05 * max(cosine[:3])
    assert max(constant[-3:]) > 0.15 * max(constant[:3])


def test_calibrate_rejects_an_unknown_schedule():
    _, fast, _, _, batches = _setup()
    with pytest.raises(ValueError, match="'linear-ish'"):
        rl.calibrate(fast, batches=batches, steps=1, schedule="linear-ish", progress=False)
