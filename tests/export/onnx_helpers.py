"""Shared helpers for the ONNX tests: export a module with relinear's translations and run it in ORT."""

from __future__ import annotations

import onnxruntime
import torch

from relinear.export.translation import custom_translation_table


def export_session(module: torch.nn.Module, args: tuple, dynamic_shapes=None) -> onnxruntime.InferenceSession:
    """Export `module` with the dynamo exporter and relinear's table, as an ORT session."""
    program = torch.onnx.export(module.eval(), args, dynamo=True, verbose=False, dynamic_shapes=dynamic_shapes,
                                custom_translation_table=custom_translation_table())
    return onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                        providers=["CPUExecutionProvider"])


def run_session(session: onnxruntime.InferenceSession, args: tuple) -> torch.Tensor:
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    return torch.from_numpy(session.run(None, feeds)[0])


def export_and_run(module: torch.nn.Module, args: tuple) -> torch.Tensor:
    return run_session(export_session(module, args), args)
