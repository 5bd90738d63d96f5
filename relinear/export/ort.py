"""ONNX Runtime helpers: a session on the right device, random inputs that respect each input's type, and
output-by-output error statistics between two models that should agree."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort
import torch

# Integer inputs (token ids, positions, type ids) are drawn below this bound, which every vocabulary and
# position table in practice exceeds; inputs named like a mask get ones (all tokens visible).
SAFE_INT_HIGH = 100
DIM_SIZES = {"batch": 2, "sequence": 16}

_NUMPY_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


def providers() -> list[str]:
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(path: str | os.PathLike, *, threads: int | None = None) -> ort.InferenceSession:
    """A session on CUDA when torch sees a GPU, else CPU. `threads` caps intra-op threads (benchmarks)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: unused-initializer notices are noise here
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(os.fspath(path), options, providers=providers())


def run(session: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def _dim_size(dim, position: int, batch: int, sequence: int) -> int:
    if isinstance(dim, int) and dim > 0:
        return dim
    return batch if position == 0 else sequence


def random_inputs(
    session: ort.InferenceSession, *, batch: int = DIM_SIZES["batch"], sequence: int = DIM_SIZES["sequence"],
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """One array per model input: dynamic dims become `batch` (first axis) or `sequence` (the others)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for arg in session.get_inputs():
        if arg.type not in _NUMPY_DTYPES:
            raise ValueError(f"input {arg.name!r}: unsupported type {arg.type}")
        dtype = _NUMPY_DTYPES[arg.type]
        shape = [_dim_size(d, i, batch, sequence) for i, d in enumerate(arg.shape)]
        if "mask" in arg.name.lower():
            arrays[arg.name] = np.ones(shape, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            arrays[arg.name] = rng.integers(0, SAFE_INT_HIGH, size=shape).astype(dtype)
        elif dtype is np.bool_:
            arrays[arg.name] = rng.random(shape) < 0.5
        else:
            arrays[arg.name] = rng.standard_normal(shape).astype(dtype)
    return arrays


@dataclass(frozen=True)
class OutputError:
    name: str
    max_abs: float
    mean_abs: float
    relative_rms: float  # ||b - a|| / ||a||: scale-free, comparable across outputs

    def __str__(self) -> str:
        return (f"{self.name}: max abs {self.max_abs:.3e}  mean abs {self.mean_abs:.3e}  "
                f"relative RMS {self.relative_rms:.3e}")


def output_error(name: str, a: np.ndarray, b: np.ndarray) -> OutputError:
    if a.shape != b.shape:
        raise ValueError(f"output {name!r}: shapes differ, {a.shape} vs {b.shape}")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    diff = np.abs(b64 - a64)
    denominator = float(np.linalg.norm(a64)) or 1.0
    return OutputError(name, float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0,
                       float(np.linalg.norm(b64 - a64)) / denominator)


def compare(
    a_path: str | os.PathLike, b_path: str | os.PathLike, inputs: dict[str, np.ndarray] | None = None,
) -> list[OutputError]:
    """Run both models on the same inputs (random ones from A's input types when None); one entry per output
    of A, matched to B's output of the same name."""
    session_a, session_b = make_session(a_path), make_session(b_path)
    inputs = random_inputs(session_a) if inputs is None else inputs
    wanted = sorted({i.name for i in session_b.get_inputs()} - set(inputs))
    if wanted:
        raise ValueError(f"{os.fspath(b_path)}: input {wanted[0]!r} is not an input of {os.fspath(a_path)}")
    out_a, out_b = run(session_a, inputs), run(session_b, inputs)
    missing = sorted(set(out_a) - set(out_b))
    if missing:
        raise ValueError(f"{os.fspath(b_path)}: has no output {missing[0]!r} (outputs: {', '.join(out_b)})")
    return [output_error(name, out_a[name], out_b[name]) for name in out_a]


def stats_as_dicts(stats: list[OutputError]) -> list[dict]:
    return [asdict(s) for s in stats]
