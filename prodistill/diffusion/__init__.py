"""Diffusion math shared by every method: EDM preconditioning and σ grids, the consistency
parameterisation, the teacher's PF-ODE solvers, the few-step samplers and the losses.

Everything here is a function of tensors and plain callables `denoise(x, sigma) -> x0_hat`, so the same code
runs with the SVD UNet, with a closed-form analytic denoiser (the quality benchmark), and under torch.compile.
"""
