"""Readable names for ONNX nodes, so `where=` globs written for the torch front end select the same sites.

The dynamo exporter records the module path of every node in its metadata (`pkg.torch.onnx.name_scopes`);
the legacy exporter encodes it in node names (`/m/encoder/layer.0/attention/self/key/MatMul`). Either
becomes `m.encoder.layer.0.attention.self.key`; a node with neither keeps its own name.
"""

from __future__ import annotations

import ast
import fnmatch

import onnx_ir as ir

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def module_path(node: ir.Node) -> str:
    scopes = node.metadata_props.get(NAME_SCOPES_KEY)
    if scopes:
        try:
            paths = [p for p in ast.literal_eval(scopes) if p]
        except (ValueError, SyntaxError):
            paths = []
        # The innermost entry may name the op itself (e.g. "scaled_dot_product_attention"), not a module.
        modules = [p for p in paths if "." in p or p == paths[0]]
        if modules:
            return modules[-1]
    name = node.name or ""
    if name.startswith("/") and name.count("/") > 1:
        return ".".join(name.strip("/").split("/")[:-1])
    return name or node.op_type


def selected(where: str | None, candidates: list[str]) -> bool:
    """`where` matches the module path, the node name or an initializer name."""
    return where is None or any(fnmatch.fnmatchcase(c, where) for c in candidates if c)
