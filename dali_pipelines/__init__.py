"""NVIDIA DALI GPU video pipelines (SPEC §4). Filled by the data issue; today clips are decoded on the CPU
with PyAV by `prodistill.data`."""
