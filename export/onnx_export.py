"""ONNX export of the four graphs (`export.graphs`) with static shapes, and the ONNX Runtime parity check.

Exporter: torch's TorchScript-based `torch.onnx.export` (dynamo=False). On the tiny UNet it exports in 7 s
where the dynamo exporter takes 24 s, with the same ONNX Runtime error (≈2e-6 on outputs of ≈1), and it
decomposes GroupNorm into InstanceNormalization at opset 18-20 (no GroupNormalization-21, which not every
runtime accepts). Graphs whose weights exceed `EXTERNAL_DATA_BYTES` keep them in one `<graph>.onnx.data`
file beside the graph (protobuf cannot hold more than 2 GB; the fp16 SVD UNet is ≈3 GB).

Parity: each graph runs in PyTorch and in ONNX Runtime on the same random inputs; the error is reported as
max |ORT − torch| and as that divided by max |torch|, and an error above `TOLERANCE[precision]` fails the
export. Both sides compute in the export precision, so this checks the export, not the precision's loss.
"""

from __future__ import annotations

import contextlib

import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from export.runtime.manifest import GraphInfo

OPSET = 19
OPSETS = (18, 19, 20)
EXTERNAL_DATA_BYTES = 1 << 30
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}
TOLERANCE_GPU_FP32 = 2e-3
"""fp32 checked on a GPU: torch's cuDNN convolutions and ONNX Runtime's CUDA provider both default to TF32 (10
mantissa bits); measured on an H100, the fp32 CLIP encoder differed by 1.9e-4 relative."""
"""Largest accepted relative error (max abs error / max |torch output|) per export precision."""


class ExportError(ValueError):
    """An export that cannot start (bad input, missing package) or that failed its check."""


def import_onnx():
    """(onnx, onnxruntime), or an ExportError with the install hint."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(f'ONNX export needs onnx and onnxruntime ({e.name} is missing): pip install ".[export]"') from None
    return onnx, onnxruntime


def example_inputs(name: str, graph: nn.Module, shapes: dict[str, tuple[int, ...]], time_ids: list[float],
                   sigma: float, generator: torch.Generator) -> dict[str, Tensor]:
    """Random float32 inputs of a graph, in the ranges the runtime feeds it (pixels in [−1, 1], x = σ·ε)."""
    inputs = {k: torch.randn(shapes[k], generator=generator) for k in graph.inputs}
    if name == "vae_encoder":
        inputs["image"] = inputs["image"].clamp(-1, 1)
    if name == "denoiser":
        inputs["x"] *= sigma
        inputs["sigma"] = torch.tensor([sigma])
        inputs["added_time_ids"] = torch.tensor([time_ids])
    return inputs


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@contextlib.contextmanager
def traceable_repeat_interleave():
    """While tracing, `Tensor.repeat_interleave` by one count (an int, or the 0-dim tensor a traced size becomes)
    runs as unsqueeze → expand → flatten. TorchScript tracing of diffusers' SVD UNet on a GPU otherwise fails in
    `emb.repeat_interleave(num_frames, ...)`: the traced frame count is a CPU tensor, and the CUDA index_select
    behind repeat_interleave refuses a CPU index (torch 2.11, H100). Shapes are static, so the count is a
    constant of the graph either way; Expand is also the simpler ONNX op."""
    original = torch.Tensor.repeat_interleave

    def repeat_interleave(self, repeats, dim=None, *, output_size=None):
        if dim is None or not (isinstance(repeats, int) or (torch.is_tensor(repeats) and repeats.dim() == 0)):
            return original(self, repeats, dim, output_size=output_size)
        d, n = dim % self.dim(), int(repeats)
        return self.unsqueeze(d + 1).expand(*self.shape[:d + 1], n, *self.shape[d + 1:]).flatten(d, d + 1)

    torch.Tensor.repeat_interleave = repeat_interleave
    try:
        yield
    finally:
        torch.Tensor.repeat_interleave = original


ATTENTION_SCORES_LIMIT = 1 << 30
"""Most elements of one materialised attention score tensor (batch × heads × queries × keys) in an exported
graph; larger attentions are exported as chunks of queries (`chunked_attention`)."""


@contextlib.contextmanager
def chunked_attention(limit: int = ATTENTION_SCORES_LIMIT):
    """While tracing, `F.scaled_dot_product_attention` whose score tensor would exceed `limit` elements runs as
    chunks of queries, each attending to all keys, concatenated (the same result: softmax is per query row).

    An exported attention is MatMul → Softmax → MatMul with the scores materialised. At 1024×576 the SVD UNet's
    first-level spatial attention has 14 frames × 5 heads × 9216 × 9216 ≈ 5.9e9 scores, beyond 32-bit element
    offsets (2^31): see README "Export" for what was measured with and without chunks in ONNX Runtime's CUDA
    provider. Chunking also bounds the runtime's peak memory (11.9 GB of fp16 scores in one piece there)."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        batch = int(query.shape[:-2].numel())  # shapes are static: traced sizes become constants
        n_q, n_k = int(query.shape[-2]), int(key.shape[-2])
        if batch * n_q * n_k <= limit or attn_mask is not None or is_causal or kwargs:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
        rows = max(1, limit // (batch * n_k))
        return torch.cat([original(query[..., i : i + rows, :], key, value, dropout_p=dropout_p, scale=scale)
                          for i in range(0, n_q, rows)], dim=-2)

    functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def export_graph(name: str, graph: nn.Module, inputs: dict[str, Tensor], folder: Path, opset: int,
                 external_data_bytes: int = EXTERNAL_DATA_BYTES,
                 attention_limit: int = ATTENTION_SCORES_LIMIT) -> GraphInfo:
    """Trace `graph` on `inputs` and write `folder/<name>.onnx` (and `.onnx.data` when large)."""
    onnx, _ = import_onnx()
    file = f"{name}.onnx"
    with (tempfile.TemporaryDirectory(dir=folder) as tmp, torch.no_grad(), warnings.catch_warnings(),
          traceable_repeat_interleave(), chunked_attention(attention_limit)):
        warnings.simplefilter("ignore")  # tracer notes on shape asserts of diffusers' blocks: shapes are static
        # traced into a scratch folder: above 2 GB torch writes one file per tensor; re-saved below as one
        torch.onnx.export(graph, tuple(inputs.values()), str(Path(tmp) / file), dynamo=False, opset_version=opset,
                          input_names=list(graph.inputs), output_names=list(graph.outputs), do_constant_folding=True)
        model = onnx.load(str(Path(tmp) / file))
    external = _weight_bytes(graph) > external_data_bytes
    data_file = f"{file}.data" if external else None
    (folder / file).unlink(missing_ok=True)
    if data_file:
        (folder / data_file).unlink(missing_ok=True)
    onnx.save_model(model, str(folder / file), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data_file, size_threshold=1024)
    with torch.no_grad():  # ONNX shape inference leaves some outputs symbolic; the traced shapes are the truth
        outputs = {graph.outputs[0]: list(graph(*inputs.values()).shape)}
    return GraphInfo(file=file, inputs={k: list(v.shape) for k, v in inputs.items()}, outputs=outputs,
                     external_data=data_file)


def check_parity(name: str, graph: nn.Module, inputs: dict[str, Tensor], folder: Path, info: GraphInfo,
                 precision: str) -> dict[str, float]:
    """Run the exported graph in ONNX Runtime and in PyTorch; raise ExportError above the tolerance."""
    import gc

    _, ort = import_onnx()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    device = next(graph.parameters()).device
    with torch.no_grad():  # torch first, its activations freed before ONNX Runtime's arena grows: measured on an
        ref = graph(*(v.to(device) for v in inputs.values())).float().cpu().numpy()  # H100 at 1024×576, the
    if torch.cuda.is_available():  # two side by side ran out of 80 GB in the temporal decoder
        torch.cuda.empty_cache()  # tracing's and the reference's cached blocks back to the driver
    session = ort.InferenceSession(str(folder / info.file), options, providers=providers)
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    del session  # its CUDA arena goes with it, before the next graph is traced
    gc.collect()
    max_abs = float(np.abs(got - ref).max())
    rel = max_abs / max(float(np.abs(ref).max()), 1e-12)
    tolerance = TOLERANCE_GPU_FP32 if precision == "fp32" and device.type == "cuda" else TOLERANCE[precision]
    result = {"max_abs": max_abs, "rel": rel, "tolerance": tolerance}
    if not np.isfinite(got).all() or not rel <= tolerance:
        raise ExportError(f"{name}: ONNX Runtime differs from PyTorch by {max_abs:.3g} (relative {rel:.3g}), "
                          f"over the {precision} tolerance {tolerance:g}; the export is not usable")
    return result


def export_all(graphs: dict[str, nn.Module], shapes: dict[str, dict[str, tuple[int, ...]]], folder: Path,
               precision: str, time_ids: list[float], sigma: float, opset: int = OPSET,
               echo: Callable[[str], None] = print, seed: int = 0,
               external_data_bytes: int = EXTERNAL_DATA_BYTES) -> dict[str, GraphInfo]:
    """Export every graph, then check it against PyTorch; returns the manifest's graph entries."""
    if opset not in OPSETS:
        raise ExportError(f"--opset must be one of {', '.join(map(str, OPSETS))} (GroupNormalization-21 at opset "
                          f"21+ is not accepted by every runtime), got {opset}")
    generator = torch.Generator().manual_seed(seed)
    infos = {}
    for name, graph in graphs.items():
        device = next(graph.parameters()).device
        inputs = example_inputs(name, graph, shapes[name], time_ids, sigma, generator)
        start = time.perf_counter()
        echo(f"exporting {name} (opset {opset}, {precision}, {_weight_bytes(graph) / 1e6:.1f} MB of weights)...")
        info = export_graph(name, graph, {k: v.to(device) for k, v in inputs.items()}, folder, opset,
                            external_data_bytes)
        echo(f"  wrote {info.file}{' + ' + info.external_data if info.external_data else ''} "
             f"in {time.perf_counter() - start:.1f} s; checking with ONNX Runtime...")
        info.parity = check_parity(name, graph, inputs, folder, info, precision)
        echo(f"  {name}: max abs error {info.parity['max_abs']:.3g}, relative {info.parity['rel']:.3g} "
             f"(tolerance {info.parity['tolerance']:g})")
        infos[name] = info
    return infos

