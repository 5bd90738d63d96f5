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
