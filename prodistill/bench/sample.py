"""`prodistill bench sample`: the teacher's 25-step CFG generation against the student's 1 step and TTS, in one
run, on every inference path present: torch eager, torch.compile (GPU only), ONNX Runtime and TensorRT.

Each generation is timed in three parts — encode (CLIP + VAE encoder of the conditioning frame), UNet (all
network calls of the sampler) and decode (the temporal VAE decoder) — with the device synchronised around each
part, after one untimed warm-up generation (two for torch.compile and the runtimes). Peak memory is the CUDA allocator's peak on GPU (torch paths), and
the process's resident high-water mark on CPU (cumulative over the run, so it only grows row to row).

Weights are random (the preset's architecture, or `--teacher`); a merged LoRA student has exactly the teacher
UNet's architecture and cost, so the teacher UNet stands in for it and no checkpoint is needed.
"""

from __future__ import annotations

import copy
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from prodistill.atomic import atomic_write_text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


class _Timer:
    """Seconds per named part, with the device synchronised before and after each part."""

    def __init__(self, device: torch.device):
        self.device, self.parts = device, {}

    def __call__(self, part: str, fn: Callable):
        _sync(self.device)
        start = time.perf_counter()
        out = fn()
        _sync(self.device)
        self.parts[part] = self.parts.get(part, 0.0) + time.perf_counter() - start
        return out


def _row(path: str, generation: str, nfe: int, timer: _Timer, device: torch.device) -> dict:
    parts = {f"{k}_s": round(v, 5) for k, v in timer.parts.items()}
    return {"path": path, "generation": generation, "nfe": nfe, **parts,
            "total_s": round(sum(timer.parts.values()), 5), "peak_mem_gb": round(_peak_gb(device), 3)}


def _torch_rows(path: str, models, unet, decode, image, cfg, device, generations, teacher_steps: int,
                warmups: int = 1) -> list[dict]:
    """Rows of one torch path (eager or compiled): `unet` is the student network, `decode` the decoder; the
    last of `warmups + 1` generations is timed."""
    from prodistill.diffusion.solvers import bind
    from prodistill.sampling import sample_student, sample_teacher

    shape = models.latent_shape(1, cfg.frames, *cfg.size())
    rows = []
    for name, nfe, run in generations:
        for _ in range(warmups + 1):  # warm-up(s), then the measured generation
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timer, gen = _Timer(device), torch.Generator(device).manual_seed(0)
            cond = timer("encode", lambda: models.condition(image, cfg.frames, cfg.fps, gen))
            if run == "teacher":
                latents = timer("unet", lambda: sample_teacher(models, cond, shape, teacher_steps, 1.0, 3.0, gen))
            else:
                denoise = bind(models.denoiser(unet), cond)
                latents = timer("unet", lambda: sample_student(denoise, shape, 1, run == "tts", cfg.num_timesteps,
                                                               gen, device))
            with torch.no_grad():
                timer("decode", lambda: decode(latents))
        rows.append(_row(path, name, nfe, timer, device))
    return rows


def _runtime_rows(path: str, pipeline, image, device) -> list[dict]:
    """Rows of a torch-free runtime path (ONNX Runtime or TensorRT) over the exported graphs."""
    import numpy as np

    from export.runtime.pipeline import Noise

    image_np = image.cpu().numpy().astype(np.float32)
    rows = []
    for name, nfe, tts in (("student 1 step", 1, False), ("student TTS", 2, True)):
        for _ in range(3):  # two warm-ups (one left ONNX Runtime's 1-step UNet at 0.88 s on an H200, slower than its
            # two TTS calls, 0.70 s: first-run work), then the measured generation
            timer, noise = _Timer(torch.device("cpu")), Noise.draw(pipeline.manifest, 0)
            cond = timer("encode", lambda: pipeline.encode(image_np, noise.augmentation))
            latents = timer("unet", lambda: pipeline.sample(cond, noise.latents, tts, noise.fresh))
            timer("decode", lambda: pipeline.decode(latents))
        row = _row(path, name, nfe, timer, device)
        row["peak_mem_gb"] = row["peak_mem_gb"] if device.type == "cpu" else None  # not seen by torch's allocator
        rows.append(row)
    return rows


PATHS = ("eager", "compile", "ort", "trt")


def parse_sample_paths(text: str) -> set[str]:
    """`--paths eager,ort` → {'eager', 'ort'}; an unknown name is one sentence."""
    paths = {p.strip() for p in text.split(",") if p.strip()}
    if unknown := sorted(paths - set(PATHS)):
        raise ValueError(f"--paths: unknown path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    return paths | {"eager"}


def _release_gpu_memory(device: torch.device) -> None:
    """Hand the torch paths' GPU memory back before ONNX Runtime or TensorRT allocate theirs in this process:
    compiled code and its CUDA-graph pools, then the caching allocator's free blocks."""
    import gc

    if device.type != "cuda":
        return
    torch._dynamo.reset()
    from torch._inductor import cudagraph_trees

    cudagraph_trees.reset_cudagraph_trees()
    gc.collect()
    torch.cuda.empty_cache()


def load_tiny_decoder(cfg, folder: Path, device: torch.device):
    """`prodistill train-decoder`'s decoder from `folder`, checked against the config's frames: small, so it is
    loaded before the models are built and a wrong folder is refused before any timing."""
    from prodistill.models.tiny_decoder import TinyTemporalDecoder

    net = TinyTemporalDecoder.load(folder, device)
    if net.frames != cfg.frames:
        raise ValueError(f"--tiny-decoder {folder} was trained for {net.frames} frames; run the bench with "
                         f"--frames {net.frames}")
    return net


def tiny_decode(cfg, models, device: torch.device, net=None) -> Callable:
    """The tiny temporal decoder as a `decode(latents)`: `net` (`load_tiny_decoder`), or (timing only) a random-init
    one of the default widths for the config's frames."""
    from prodistill.models.tiny_decoder import TinyTemporalDecoder

    if net is None:
        net = TinyTemporalDecoder(frames=cfg.frames, latent_channels=models.latent_channels).to(device).eval()
    net = net.to(models.dtype)
    return lambda latents: net(latents.to(models.dtype)).float().clamp(-1, 1)


def run_sample_bench(cfg, device: torch.device, teacher_steps: int = 25, paths: set[str] | frozenset = frozenset(PATHS),
                     echo: Callable[[str], None] = print, tiny_decoder: Path | None = None) -> dict:
    from export.onnx_export import ExportError, import_onnx
    from export.run import build_engines, export_graphs
    from export.runtime.pipeline import OneStepPipeline
    from export.runtime.tensorrt import tensorrt_available
    from prodistill.accel.rewrites import apply_rewrites
    from prodistill.training.run import build_models

    width, height = cfg.size()
    trained_decoder = load_tiny_decoder(cfg, tiny_decoder, device) if tiny_decoder is not None else None
    echo(f"building {cfg.preset} models ({width}x{height}, {cfg.frames} frames, {cfg.dtype}) on {device}...")
    models = build_models(cfg, device)
    apply_rewrites([models.unet])  # as `prodistill sample` runs it (and `export` traces it)
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    generations = [(f"teacher {teacher_steps}-step CFG", 2 * teacher_steps, "teacher"),
                   ("student 1 step", 1, "one"), ("student TTS", 2, "tts")]
    rows, skipped = [], {}
    echo("torch eager...")
    rows += _torch_rows("torch eager", models, models.unet, models.decode, image, cfg, device, generations, teacher_steps)
    decode_tiny = tiny_decode(cfg, models, device, trained_decoder)
    tiny_rows = [("student 1 step, tiny decoder", 1, "one")]
    rows += _torch_rows("torch eager", models, models.unet, decode_tiny, image, cfg, device, tiny_rows, teacher_steps)

    if "compile" not in paths:
        skipped["torch.compile"] = "not in --paths"
    elif device.type == "cuda":
        echo("torch.compile (reduce-overhead: CUDA graphs) of the student UNet and the decoder; compiling...")
        unet = torch.compile(models.unet, mode="reduce-overhead", fullgraph=False)
        decode = torch.compile(models.decode, mode="reduce-overhead")
        rows += _torch_rows("torch.compile", models, unet, decode, image, cfg, device, generations[1:],
                            teacher_steps, warmups=2)  # CUDA graph trees record on the second call, replay after
        decode_tiny = torch.compile(decode_tiny, mode="reduce-overhead")
        rows += _torch_rows("torch.compile", models, unet, decode_tiny, image, cfg, device, tiny_rows, teacher_steps,
                            warmups=2)
        del unet, decode, decode_tiny
    else:
        skipped["torch.compile"] = "GPU only (CUDA graphs)"
    _release_gpu_memory(device)

    precision = "fp32" if device.type == "cpu" else ("bf16" if cfg.dtype == "bf16" else "fp16")
    try:
        _, ort = import_onnx()
    except ExportError as e:
        skipped["onnxruntime"] = skipped["tensorrt"] = str(e)
        return {"config": _config(cfg, device, teacher_steps), "rows": rows, "skipped": skipped}
    if "ort" not in paths:
        skipped["onnxruntime"] = "not in --paths"
    elif device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        skipped["onnxruntime"] = ("no CUDA execution provider (onnxruntime-gpu is not installed); the CPU provider "
                                  "at this size would take minutes")
    if "trt" not in paths:
        skipped["tensorrt"] = "not in --paths"
    elif not tensorrt_available():
        skipped["tensorrt"] = "TensorRT is not installed"
    if "onnxruntime" in skipped and "tensorrt" in skipped:  # no runtime path: nothing to export
        return {"config": _config(cfg, device, teacher_steps), "rows": rows, "skipped": skipped}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        echo(f"exporting the graphs ({precision}) for the runtime paths...")
        models.to(device, torch.float32)  # the torch rows are done; graphs are cast from float32 weights
        manifest = export_graphs(models, copy.deepcopy(models.unet), cfg, folder, precision, echo=echo)
        models.to("cpu")  # the runtimes below need the GPU memory; their inputs come from numpy
        _release_gpu_memory(device)
        if "onnxruntime" not in skipped:
            echo("onnxruntime...")
            rows += _runtime_rows("onnxruntime", OneStepPipeline(folder, "ort", device.type), image, device)
        if "tensorrt" not in skipped:
            echo("building TensorRT engines...")
            build_engines(manifest, folder, echo=echo)
            rows += _runtime_rows("tensorrt", OneStepPipeline(folder, "trt"), image, device)
    return {"config": _config(cfg, device, teacher_steps), "rows": rows, "skipped": skipped}


def _config(cfg, device: torch.device, teacher_steps: int) -> dict:
    return {"preset": cfg.preset, "resolution": cfg.resolution, "frames": cfg.frames, "dtype": cfg.dtype,
            "device": str(device), "teacher_steps": teacher_steps, "teacher": cfg.teacher,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def format_sample_table(result: dict) -> str:
    rows = result["rows"]
    teacher = next(r["total_s"] for r in rows if r["path"] == "torch eager" and r["generation"].startswith("teacher"))
    lines = [f"{'path':<14} {'generation':<22} {'NFE':>4} {'encode s':>9} {'UNet s':>9} {'decode s':>9} "
             f"{'total s':>9} {'vs teacher':>10} {'peak GB':>8}"]
    for r in rows:
        peak = "n/a" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.2f}"
        lines.append(f"{r['path']:<14} {r['generation']:<22} {r['nfe']:>4} {r['encode_s']:>9.4f} {r['unet_s']:>9.4f} "
                     f"{r['decode_s']:>9.4f} {r['total_s']:>9.4f} {teacher / r['total_s']:>9.1f}x {peak:>8}")
    lines += [f"skipped {k}: {v}" for k, v in result["skipped"].items()]
    return "\n".join(lines)


def write_sample_json(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return path
