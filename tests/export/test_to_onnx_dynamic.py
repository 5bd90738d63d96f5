"""`to_onnx` leaves every input axis dynamic that the model does not fix: a file exported with a 4-D mask
input runs at other sequence lengths."""

import onnxruntime
import torch

import relinear as rl
from tests.passes.attention_modules import MaskInputAttention, padding_mask


def test_a_4d_mask_input_keeps_its_sequence_axes_dynamic(tmp_path):
    torch.manual_seed(0)
    module = MaskInputAttention().eval()
    rl.export.to_onnx(module, (torch.randn(2, 8, 32), padding_mask([8, 5], 8, causal=True)), tmp_path / "m.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x, mask = torch.randn(3, 13, 32), padding_mask([13, 9, 4], 13, causal=True)
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), (x, mask), strict=True)}
    rows = mask[:, 0, :, -1]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, feeds)[0])[rows], module(x, mask)[rows],
                                   rtol=1e-5, atol=1e-5)


def test_a_float_feature_input_keeps_its_width_and_varies_batch_and_length(tmp_path):
    """A Monarch layer reading a [B, T, D] float input: D stays the weights' width (its lowering needs it),
    batch and length stay dynamic; the file equals the rewritten torch model at other sizes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()
    recipe = rl.Recipe([rl.Monarch(nblocks=4, min_speedup=0)])
    rl.export.to_onnx(model, (torch.randn(2, 5, 64),), tmp_path / "m.onnx", recipe)
    fast, _ = rl.rewrite(model, (torch.randn(2, 5, 64),), recipe, progress=False)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 7, 64)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), fast(x), rtol=1e-5, atol=1e-5)
