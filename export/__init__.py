"""Export of a distilled student for 1-step serving (SPEC §5): `prodistill export`.

- `export.graphs`: the merged student and the four graphs (CLIP image encoder, VAE encoder, the student's EDM
  denoiser, the VAE temporal decoder) as float32-in/float32-out torch modules;
- `export.onnx_export`: ONNX export with static shapes (opset 18-20, external data when large) and the
  ONNX Runtime vs PyTorch parity check;
- `export.diffusers_folder`: the merged student as a `StableVideoDiffusionPipeline` folder;
- `export.run`: the `prodistill export` orchestration;
- `export.runtime`: the torch-free runtime (`prodistill generate`), including `export.runtime.tensorrt`,
  the one module that makes TensorRT calls (engine building and execution).

Importing `export` imports nothing heavy; torch is needed by the exporters, never by `export.runtime`.
"""
