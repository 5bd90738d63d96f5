"""ONNX: export rewritten models (`to_onnx`), rewrite existing files (`rewrite_onnx`), compare them in ONNX
Runtime (`ort.compare`). Everything written uses standard ONNX ops only, so stock ORT runs it."""

from relinear.export.model_io import OnnxInputError
from relinear.export.rewrite_onnx import rewrite_onnx
from relinear.export.to_onnx import to_onnx
from relinear.export.translation import custom_translation_table

__all__ = ["OnnxInputError", "custom_translation_table", "rewrite_onnx", "to_onnx"]
