"""Regional `torch.compile` of the networks in the training step, with an on-disk cache.

Why regions, and why these: compiling the whole SVD UNet (and DINOv2, and each of their train/no-grad and
batch variants) measured 495 s before the first step on an H100, and compiling each UNet *stage* (down / mid /
up block) as a region was no better — every stage has its own shapes, so nothing is shared and the variants
(teacher, EMA target, student with grad) multiply the work: it had not finished its first step after 8.5 min.
Compiling only the innermost blocks (res-blocks, transformer blocks) cut compile time 3.6× but lost most of the
speed-up, because the code *between* those blocks (norms, projections, the frame/token permutes, time mixing)
stayed eager (../shared/GPU.md). The regions here are the level that keeps both: each `SpatioTemporalResBlock`
(spatial res-block + temporal res-block + their learned mix) and each `TransformerSpatioTemporalModel` (norm,
projections, the permutes, spatial and temporal transformer blocks, positional time embedding, the mix), the
down/up-samplers, each DINOv2 layer, and the discriminator's upsampler and heads. Left eager: the torch.cat of
the skip connections, the UNet's time embedding and conv_in/out, and the EDM/consistency arithmetic.

Every region is compiled with `fullgraph=True` (a graph break is an error, not a silent slow path) and
`dynamic=False` (shapes are static in training). A region's compiled code is shared by every instance of its
class with the same shapes and attributes (a UNet has 22 res-blocks but 14 distinct shapes, 16 attention models
but 4), so all attention modules of a UNet are given one shared processor object (dynamo guards on it; one
object per module forces a compile per module). The variants that remain — teacher (batch 2B for CFG, no
grad), EMA target (batch B, no grad) and student (batch B, with grad) — are distinct graphs, so the recompile
limit is raised above what those need (dynamo's default of 8 per code object silently falls back to eager past
it; here it fails loudly instead).

Inductor's FX-graph and AOT-autograd caches live in `cache_dir` (`--compile-cache`), so a second launch of
the same configuration reuses the compiled kernels instead of rebuilding them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

REGION_CLASSES = (
    # diffusers UNetSpatioTemporalConditionModel: its res-blocks, attention models and samplers
    "SpatioTemporalResBlock", "TransformerSpatioTemporalModel", "Downsample2D", "Upsample2D",
    # transformers Dinov2Model
    "Dinov2Embeddings", "Dinov2Layer",
    # prodistill's latent discriminator
    "LatentUpsampler", "DiscriminatorHeads",
)
"""Class names of the modules compiled as regions (matched anywhere in a network's module tree)."""

REGION_MODULES = ("diffusers.models.resnet", "diffusers.models.transformers.transformer_temporal",
                  "diffusers.models.downsampling", "diffusers.models.upsampling",
                  "transformers.models.dinov2.modeling_dinov2", "prodistill.models.discriminator",
                  "peft.tuners.lora")
"""Where those classes (and the LoRA layers inside the student's regions) are defined: what a background compile
process imports to rebuild a region (`prodistill.accel.precompile.Precompiler.prewarm`)."""

RECOMPILE_LIMIT = 192
"""Per code object: SVD-XT's 14 res-block shapes × {teacher, EMA, student} = 42 variants per resolution, so a run
may train at up to four resolutions (`--stage1-resolution`, `--resolution-schedule`)."""


OPTIONS_ENV = "PRODISTILL_INDUCTOR_OPTIONS"


def inductor_options() -> dict:
    """Extra inductor options for every compiled region, given as a JSON object in $PRODISTILL_INDUCTOR_OPTIONS (e.g.
    `{"cpp_wrapper": true}`, `{"max_autotune": true}`): a developer's switch for measuring inductor's options with
    `bench train` without code changes. They are part of each ahead-of-time variant's identity on disk."""
    text = os.environ.get(OPTIONS_ENV, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        example = '{"cpp_wrapper": true}'
        raise ValueError(f"${OPTIONS_ENV} is not JSON ({e}): give an object such as '{example}'") from None
    if not isinstance(options, dict):
        raise ValueError(f"${OPTIONS_ENV} must be a JSON object of inductor options, not {type(options).__name__}")
    import torch._inductor.config as inductor_config

    unknown = sorted(k for k in options if not hasattr(inductor_config, k.split(".")[0]))
    if unknown:
        raise ValueError(f"${OPTIONS_ENV}: {', '.join(unknown)} is no option of torch._inductor.config")
    return options


def compile_fn(fn, backend: str):
    """`torch.compile` of a region's forward: fullgraph, static shapes, with `inductor_options()` for inductor."""
    options = inductor_options() if backend == "inductor" else {}
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, options=options or None)


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


def share_attention_processors(networks: list[nn.Module]) -> int:
    """Give every attention module of the diffusers networks one shared processor object of the class they
    all use (by default `AttnProcessor2_0`; one object for all networks), so compiled regions guard on one
    object instead of one per module. Networks with mixed processor classes are left alone. Returns the
    networks changed."""
    shared: dict[type, object] = {}
    changed = 0
    for net in networks:
        procs = list(getattr(net, "attn_processors", {}).values())
        if not procs or len({type(p) for p in procs}) != 1:
            continue
        cls = type(procs[0])
        if cls not in shared:
            try:
                shared[cls] = cls()
            except TypeError:  # a processor that needs arguments: keep the per-module objects
                continue
        if any(p is not shared[cls] for p in procs):
            net.set_attn_processor(shared[cls])
            changed += 1
    return changed


def compile_regions(networks: list[nn.Module], backend: str = "inductor", wrap=None) -> list[nn.Module]:
    """Replace each region's `forward` by a compiled one (fullgraph, static shapes); returns the regions.

    The class's `forward` bound to the module is compiled, so dynamo's cache sits on the class's `forward`
    code: instances of one class with the same shapes share a graph, and each class has its own recompile
    budget. A module already compiled for itself is left alone; one that carries another module's compiled
    forward (a copy of a compiled network) gets its own."""
    _configure_dynamo()
    share_attention_processors(networks)
    regions = find_regions(networks)
    if wrap is not None:  # ahead-of-time compilation (`prodistill.accel.precompile.Precompiler.wrap`)
        wrap(regions)
        return regions
    for module in regions:
        if getattr(vars(module).get("forward"), "_prodistill_owner", None) is module:
            continue
        compiled = compile_fn(type(module).forward.__get__(module), backend)
        compiled._prodistill_owner = module
        module.forward = compiled
    return regions

