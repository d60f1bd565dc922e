"""ONNX / TensorRT export of the distilled 1-step student, the VAE temporal decoder and the image encoder,
and the torch-free serving runtime (SPEC §5). Filled by the export issue; nothing here yet."""
