"""`prodistill generate`: the torch-free 1-step generation. Registered in the full `prodistill` CLI and
dispatched by `prodistill.entry` before that CLI (which imports torch) is loaded; also `python -m export.runtime`."""

from __future__ import annotations

import click


@click.command()
@click.option("--engines", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder written by `prodistill export` (manifest.json, ONNX graphs, TensorRT engines).")
@click.option("--image", required=True, type=click.Path(exists=True, dir_okay=False), help="Conditioning image.")
@click.option("--out", "out_path", default="generated.mp4", show_default=True, help="Output mp4 (H.264).")
@click.option("--tts/--no-tts", default=False, show_default=True,
              help="Time Travel Sampler (OSV eq. 13): two student calls instead of one.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of numpy's generator for all noise.")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True,
              help="ort: ONNX Runtime (CPU, or CUDA with onnxruntime-gpu); trt: the TensorRT engines.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="ONNX Runtime's device (auto: CUDA when onnxruntime-gpu provides it).")
def generate(engines, image, out_path, tts, seed, backend, device) -> None:
    """Generate a video from one image with the exported 1-step student, without torch."""
    from export.runtime.backends import BackendError
    from export.runtime.pipeline import OneStepPipeline

    try:
        path = OneStepPipeline(engines, backend, device).generate(image, out_path, tts=tts, seed=seed)
    except (BackendError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {path}")
