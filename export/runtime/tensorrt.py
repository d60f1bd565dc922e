"""Every TensorRT call of prodistill: building engines from the exported ONNX graphs, and running them.

Written against the TensorRT 10/11 Python API and cuda-python's runtime bindings. TensorRT cannot be installed
on the project's development machines (its PyPI packages are stubs that fetch the real wheel from NVIDIA at
install time), so this module is exercised only where TensorRT exists (the Docker image); its tests skip
without it. Its ONNX input is checked with ONNX Runtime against PyTorch at export time.

- Networks are strongly typed: precision comes from the graph's own casts (TensorRT 11 has no other mode;
  10.x accepts the same path and deprecates the FP16/BF16 builder flags).
- A timing cache in the engines folder makes a rebuild (another resolution, a retrained student) skip the
  kernel timing it already did; the workspace limit bounds the tactics' scratch memory.
- The runtime keeps static device buffers and pinned host buffers per engine (shapes are static), and
  captures host→device copies, the engine and device→host copies into one CUDA graph on the first call, so a
  later call is one graph launch.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from export.runtime.backends import BackendError
from export.runtime.manifest import Manifest

INSTALL_HINT = ("TensorRT is not installed: use the prodistill Docker image (it has TensorRT 10 and "
                "cuda-python), or install NVIDIA's tensorrt wheel from NVIDIA's package index")
TIMING_CACHE = "timing.cache"


def import_tensorrt():
    """(tensorrt, cuda runtime bindings), or a BackendError with the install hint."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(INSTALL_HINT) from None
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise BackendError("the trt backend needs cuda-python: pip install cuda-python") from None
    return trt, cudart


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except BackendError:
        return False
    return True


def build_engine(onnx_path: Path, engine_path: Path, workspace_gib: float = 8.0,
                 timing_cache: Path | None = None) -> Path:
    """Parse `onnx_path` (external data is read from beside it) into a strongly typed network and write its
    serialized engine to `engine_path`, reading and updating `timing_cache`."""
    trt, _ = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


def _check(result):
    """cuda-python calls return (error, *values): raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA runtime error {err}")
    return values[0] if len(values) == 1 else values


class _Engine:
    """One deserialized engine with its static buffers and, after the first call, its CUDA graph."""

    def __init__(self, trt, cudart, runtime, path: Path, stream):
        self.cudart, self.stream = cudart, stream
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not load {path.name}: rebuild it with this TensorRT version "
                               "(prodistill export --trt)")
        self.context = self.engine.create_execution_context()
        self.host, self.device, self.inputs, self.outputs = {}, {}, [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            nbytes = int(np.prod(shape)) * dtype.itemsize
            host_ptr = _check(cudart.cudaMallocHost(nbytes))
            self.host[name] = np.frombuffer((ctypes.c_byte * nbytes).from_address(int(host_ptr)),
                                            dtype).reshape(shape)
            self.device[name] = _check(cudart.cudaMalloc(nbytes))
            self.context.set_tensor_address(name, int(self.device[name]))
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(name)
        self.graph = None

    def _enqueue(self) -> None:
        cudart, kind = self.cudart, self.cudart.cudaMemcpyKind
        for name in self.inputs:
            _check(cudart.cudaMemcpyAsync(self.device[name], self.host[name].ctypes.data, self.host[name].nbytes,
                                          kind.cudaMemcpyHostToDevice, self.stream))
        if not self.context.execute_async_v3(int(self.stream)):
            raise BackendError("TensorRT execution failed")
        for name in self.outputs:
            _check(cudart.cudaMemcpyAsync(self.host[name].ctypes.data, self.device[name], self.host[name].nbytes,
                                          kind.cudaMemcpyDeviceToHost, self.stream))

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self.cudart
        for name in self.inputs:
            np.copyto(self.host[name], inputs[name], casting="same_kind")
        if self.graph is None:
            self._enqueue()  # the first call runs eagerly: TensorRT allocates lazily and cannot be captured then
            _check(cudart.cudaStreamSynchronize(self.stream))
            _check(cudart.cudaStreamBeginCapture(self.stream,
                                                 cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
            self._enqueue()
            self.graph = _check(cudart.cudaGraphInstantiate(_check(cudart.cudaStreamEndCapture(self.stream)), 0))
        else:
            _check(cudart.cudaGraphLaunch(self.graph, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return {name: self.host[name].copy() for name in self.outputs}


class TrtBackend:
    """The `trt` backend: one engine per graph of the manifest, sharing one CUDA stream."""

    name = "trt"

    def __init__(self, folder: Path, manifest: Manifest):
        trt, cudart = import_tensorrt()
        missing = [g for g, info in manifest.graphs.items() if not info.engine or not (folder / info.engine).is_file()]
        if missing:
            raise BackendError(f"{folder} has no TensorRT engine for {', '.join(missing)}: "
                               "export with --trt on the serving GPU, or use --backend ort")
        self.cudart = cudart
        self.stream = _check(cudart.cudaStreamCreate())
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {g: _Engine(trt, cudart, runtime, folder / info.engine, self.stream)
                        for g, info in manifest.graphs.items()}

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.engines[graph](inputs)

    def gpu_memory_used(self) -> int:
        free, total = _check(self.cudart.cudaMemGetInfo())
        return int(total) - int(free)
