"""prodistill: distil a many-step video diffusion teacher (Stable Video Diffusion) into a 1-4 step student.

Importing the package is light on purpose: no model is built and no optional backend (DALI, Transformer
Engine, TensorRT, compiled ops) is imported until a command uses it.
"""

__version__ = "0.1.0"
