"""Regional `torch.compile` of the networks in the training step, with an on-disk cache.

Why regions, and why these: compiling the whole SVD UNet (and DINOv2, and each of their train/no-grad and
batch variants) measured 495 s before the first step on an H100, while compiling only the innermost repeated
blocks (res-blocks, transformer blocks) cut that to 136 s but lost most of the speed-up, because the code
*between* those blocks (norms, convs, up/down-samplers, time mixing) stayed eager (../shared/GPU.md). The
regions here are one level up: each UNet stage (down / mid / up block, which holds its res-blocks, attention
models, samplers and the glue between them), each DINOv2 layer (12 identical layers: one compile serves all),
and the discriminator's upsampler and heads. Only the UNet's thin top level (time embedding, conv_in/out) and
the EDM/consistency arithmetic around it stay eager.

Every region is compiled with `fullgraph=True` (a graph break is an error, not a silent slow path) and
`dynamic=False` (shapes are static in training). A region's compiled code is shared by every instance of its
class with the same shapes; the variants that remain — teacher (batch 2B for CFG, no grad), EMA target
(batch B, no grad) and student (batch B, with grad) — are distinct graphs, so the recompile limit is raised
above what those need (dynamo's default of 8 per code object silently falls back to eager past it; here it
fails loudly instead).

Inductor's FX-graph and AOT-autograd caches live in `cache_dir` (`--compile-cache`), so a second launch of
the same configuration reuses the compiled kernels instead of rebuilding them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

REGION_CLASSES = (
    # diffusers UNetSpatioTemporalConditionModel stages
    "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal", "UNetMidBlockSpatioTemporal",
    "UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
    # transformers Dinov2Model
    "Dinov2Embeddings", "Dinov2Layer",
    # prodistill's latent discriminator
    "LatentUpsampler", "DiscriminatorHeads",
)
"""Class names of the modules compiled as regions (matched anywhere in a network's module tree)."""

RECOMPILE_LIMIT = 64
"""Per code object: stage classes × widths × {teacher, EMA, student} variants stay well under it."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prodistill" / "compile"


def use_cache_dir(cache_dir: str | Path | None) -> Path:
    """Point inductor's (and Triton's) on-disk caches at `cache_dir`, creating it. Must run before the first
    compile of the process."""
    path = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(path / "triton")
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return path


def _configure_dynamo() -> None:
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit,
                                                    8 * RECOMPILE_LIMIT)
    dynamo_config.fail_on_recompile_limit_hit = True


def find_regions(networks: list[nn.Module], classes: tuple[str, ...] = REGION_CLASSES) -> list[nn.Module]:
    """The modules of `networks` whose class is a region (outermost only, each module once)."""
    seen: set[int] = set()
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if type(module).__name__ in classes:
            found.append(module)
            return
        for child in module.children():
            visit(child)

    for net in networks:
        visit(net)
    return found


def compile_regions(networks: list[nn.Module], backend: str = "inductor") -> list[nn.Module]:
    """Replace each region's `forward` by a compiled one (fullgraph, static shapes); returns the regions.

    The class's `forward` bound to the module is compiled, so dynamo's cache sits on the class's `forward`
    code: instances of one class with the same shapes share a graph, and each class has its own recompile
    budget. A module already compiled for itself is left alone; one that carries another module's compiled
    forward (a copy of a compiled network) gets its own."""
    _configure_dynamo()
    regions = find_regions(networks)
    for module in regions:
        if getattr(vars(module).get("forward"), "_prodistill_owner", None) is module:
            continue
        compiled = torch.compile(type(module).forward.__get__(module), fullgraph=True, dynamic=False,
                                 backend=backend)
        compiled._prodistill_owner = module
        module.forward = compiled
    return regions

