"""The torch-free serving runtime: a 1-step (or Time Travel Sampler, NFE 2) image-to-video generation from the
graphs that `prodistill export` writes.

It imports numpy, Pillow, PyAV and one inference backend (onnxruntime, or TensorRT with cuda-python) and
nothing of `prodistill`, so a serving image needs neither torch nor the training code. Every step that the
training side does in torch (image resize and crop, CLIP normalisation, SVD's conditioning, the consistency
sampler and TTS, uint8 conversion) has a numpy twin here, tested against the torch original on the same input.
"""

from export.runtime.manifest import Manifest
from export.runtime.pipeline import OneStepPipeline

__all__ = ["Manifest", "OneStepPipeline"]
