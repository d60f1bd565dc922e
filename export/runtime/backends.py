"""Inference backends behind one interface: run a named graph of the engines folder on float32 arrays.

`ort` (onnxruntime) runs the ONNX graphs on the CPU, or on the GPU when onnxruntime-gpu provides the CUDA
execution provider; `trt` runs the TensorRT engines (`export.runtime.tensorrt`, which owns every TensorRT
call). Both are imported only when chosen, with a one-sentence install hint when missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from export.runtime.manifest import MANIFEST, GraphInfo, Manifest

BACKENDS = ("ort", "trt")


class BackendError(RuntimeError):
    """The requested backend cannot run here (missing package, missing engine file)."""


class Backend(Protocol):
    name: str

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of `graph` (a key of the manifest's graphs) for float32 inputs of the exported shapes."""

    def gpu_memory_used(self) -> int | None:
        """Bytes in use on the backend's GPU (all processes), or None where it runs on no GPU it can query."""


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendError('the ort backend needs onnxruntime: pip install ".[export]" (or onnxruntime-gpu '
                           'for the CUDA provider)') from None
    return onnxruntime


class OrtBackend:
    """One onnxruntime session per graph, created at start-up (session creation optimises the graph)."""

    name = "ort"

    def __init__(self, folder: Path, manifest: Manifest, device: str = "auto"):
        ort = import_onnxruntime()
        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        if device == "cuda" and not cuda:
            raise BackendError("--device cuda needs onnxruntime-gpu (the CUDA execution provider is not available)")
        self.providers = (["CUDAExecutionProvider"] if cuda and device != "cpu" else []) + ["CPUExecutionProvider"]
        if len(self.providers) > 1 and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels: no torch here to have loaded them
        options = ort.SessionOptions()
        options.log_severity_level = 3  # constant-folding notices about fp16 nodes are not actionable
        # The CUDA arena grows by what a request needs, not to the next power of two (its default): four sessions
        # share the GPU, and at 14×576×1024 the decoder's 4.2 GB request found no room under the default (H100)
        providers = [(p, {"arena_extend_strategy": "kSameAsRequested"}) if p == "CUDAExecutionProvider" else p
                     for p in self.providers]
        self.sessions = {name: _session(ort, folder, name, info, options, providers)
                         for name, info in manifest.graphs.items()}

    def gpu_memory_used(self) -> None:
        """onnxruntime has no provider-neutral memory query (and no torch here to ask)."""
        return None

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.sessions[graph]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, {k: np.ascontiguousarray(v, np.float32) for k, v in inputs.items()})))


def _session(ort, folder: Path, name: str, info: GraphInfo, options, providers):
    """The graph's session, after checking its files exist and that its inputs are the manifest's: a missing,
    damaged or swapped graph is one sentence naming the file, not an error of ONNX Runtime mid-generation."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph, InvalidProtobuf

    again = "export the folder again with `prodistill export`"
    for file in filter(None, (info.file, info.external_data)):
        if not (folder / file).is_file():
            raise BackendError(f"{folder} has no {file}, a file of its {name} graph: {again}")
    path = folder / info.file
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except (InvalidGraph, InvalidProtobuf):
        raise BackendError(f"{path} is damaged (ONNX Runtime cannot parse it): {again}") from None
    inputs = {i.name: i.shape for i in session.get_inputs()}
    if inputs != info.inputs:
        raise BackendError(f"{path} takes {inputs}, but {folder / MANIFEST} says {info.inputs}: the folder mixes "
                           f"two exports; {again}")
    return session


def open_backend(name: str, folder: str | Path, manifest: Manifest, device: str = "auto") -> Backend:
    """The `--backend` named `name` over the graphs (ort) or engines (trt) of `folder`."""
    folder = Path(folder)
    if name == "ort":
        return OrtBackend(folder, manifest, device)
    if name == "trt":
        from export.runtime.tensorrt import TrtBackend

        return TrtBackend(folder, manifest)
    raise BackendError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
