"""Reading ONNX files defensively and writing them atomically.

A rewrite reads a file the user owns and writes one they will ship, so reading rejects what ONNX Runtime
would later choke on (with one line naming the file and the field) and writing never leaves a half-written
model or data file behind: everything goes to a temporary folder beside the target, then `os.replace`.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

MIN_OPSET = 13
REPORT_KEY = "relinear.report"


class OnnxInputError(ValueError):
    """An input ONNX file relinear cannot use; the message names the file and what is wrong with it."""


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_graph(path: str, proto: onnx.ModelProto) -> None:
    """Raise `OnnxInputError` for the faults a rewrite cannot work around, naming the culprit."""
    if not proto.graph.node and not proto.graph.output:
        raise OnnxInputError(f"{path}: not an ONNX model (no graph)")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < MIN_OPSET:
        raise OnnxInputError(
            f"{path}: opset_import ai.onnx version {opset} is unsupported (need >= {MIN_OPSET})"
        )
    defined = {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer} | {""}
    defined |= {i.name for i in proto.graph.sparse_initializer}
    for node in proto.graph.node:
        for name in node.input:
            if name not in defined:
                raise OnnxInputError(
                    f"{path}: node {node.name or node.op_type!r} reads {name!r}, "
                    "which no initializer, graph input or earlier node defines"
                )
        defined.update(node.output)


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load and validate an ONNX file (external data stays on disk until it is read)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OnnxInputError(f"{path}: no such file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as e:
        raise OnnxInputError(f"{path}: not a readable ONNX file ({_first_line(e)})") from None
    check_graph(path, proto)
    try:
        onnx.checker.check_model(path)
    except onnx.checker.ValidationError as e:
        raise OnnxInputError(f"{path}: invalid ONNX model: {_first_line(e)}") from None
    return ir.load(path)


def uses_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def check_written(path: str) -> None:
    """The written model passes the checker with strict shape inference (raises ValueError otherwise)."""
    try:
        onnx.checker.check_model(path, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ValueError(f"relinear wrote an invalid model ({_first_line(e)}); nothing was saved") from None


def save_atomic(model: ir.Model, dst: str | os.PathLike, *, external_data: bool) -> None:
    """Write `model` (and `<dst>.data` when `external_data`) so that a failure leaves nothing at `dst`.

    The staged copy must pass `check_written` before it is moved into place.
    """
    dst = os.path.abspath(os.fspath(dst))
    folder, name = os.path.split(dst)
    if not os.path.isdir(folder):
        raise OnnxInputError(f"{dst}: the output folder does not exist")
    staging = tempfile.mkdtemp(prefix=f".{name}.", dir=folder)
    try:
        data_name = f"{name}.data" if external_data else None
        ir.save(model, os.path.join(staging, name), external_data=data_name)
        check_written(os.path.join(staging, name))
        if data_name:
            os.replace(os.path.join(staging, data_name), os.path.join(folder, data_name))
        os.replace(os.path.join(staging, name), dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_report_json(path: str | os.PathLike) -> str | None:
    """The report relinear stored in a model's metadata_props, or None for a file relinear did not write."""
    model = load_model(path)
    return model.metadata_props.get(REPORT_KEY)
