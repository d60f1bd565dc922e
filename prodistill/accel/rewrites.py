"""Exact rewrites of SVD UNet operations into cheaper ones (`--exact-rewrites`).

A rewrite computes the same function as the layer it replaces, keeps the parameter objects and the state dict,
and is undone by `apply_rewrites(..., on=False)`. There is one on by default, and one experimental:

- Single-key attention. SVD's cross-attention attends to one token — the CLIP image embedding (spatial blocks:
  `(B·F, 1, 1024)`; temporal blocks: the first frame's, `(B·h·w, 1, 1024)`). A softmax over one key is exactly 1,
  so the attention output is the value for every query: `out = to_out(to_v(c))`, broadcast over the queries. The
  query and key projections, the attention kernel and the output projection over every token disappear; the
  output projection runs on one token instead of h·w. Gradients are the same: through a one-key softmax the
  query and key get exactly zero gradient in the original form (their LoRA factors then get none at all, so the
  rewrite is single-process only: DDP would wait for those gradients).

Measured on an H200 (SVD-XT UNet, bf16, 512², 14 frames, batch 1, one eager forward replayed as a CUDA graph):
92.3 ms → 83.7 ms. Tried and dropped: the temporal res-blocks' Conv3d with kernel (3, 1, 1) run as a Conv2d with
kernel (3, 1) over (frames, h·w) — exact too, but no faster (93.3 ms alone, 84.9 ms with the attention rewrite).

- Temporal convolution as one GEMM (`temporal_gemm=True`; off by default: `bench train` configuration
  `compile+graphs+conv-gemm`). The temporal res-blocks' Conv3d, kernel (3, 1, 1), is per output frame
  W₀·x_{f−1} + W₁·x_f + W₂·x_{f+1} (zero frames beyond the ends): one GEMM of the channels-last stack
  [x_{f−1}, x_f, x_{f+1}] (B, F, h, w, 3C) with W (C_out, 3C). Inside a compiled region inductor writes that stack
  straight from the GroupNorm/SiLU kernel before it, so cuDNN's layout transposes around the Conv3d go away; the
  GEMM's result is a channels-last tensor seen as (B, C_out, F, h, w). In eager mode the stack is an extra copy.
  Measured per shape on an H200 (compiled GroupNorm → SiLU → conv, bf16, 14 frames, CUDA-graph replays, forward /
  forward+backward ms, Conv3d → GEMM): C=320 at 64², 0.229 → 0.286 / 0.974 → 1.321; C=640 at 32², 0.156 → 0.183 /
  0.655 → 0.761; C=1280 at 16², 0.175 → 0.129 / 0.612 → 0.480; C=1280 at 8², 0.121 → 0.051 / 0.377 → 0.179. So the
  GEMM form is used only where a frame has at most `TemporalGemmConv3d.max_positions` (256) positions, and cuDNN's
  Conv3d elsewhere; the choice is made per input shape, once per compiled variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn


class SingleKeyAttnProcessor(AttnProcessor2_0):
    """`AttnProcessor2_0`, except that attention to a single key (no mask, 3-D input, inactive output dropout)
    returns the projected value broadcast over the queries — exactly what the softmax computes there."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if not _single_key(attn, hidden_states, encoder_hidden_states, attention_mask):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        value = attn.to_out[0](attn.to_v(context))  # (B, 1, C): softmax over one key is 1, the output is the value
        out = value.expand(hidden_states.shape[0], hidden_states.shape[1], value.shape[-1])  # dtype as the original's
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _single_key(attn: Attention, hidden_states, context, mask) -> bool:
    dropout = attn.to_out[1] if len(attn.to_out) > 1 else None
    return (context is not None and context.shape[1] == 1 and mask is None and hidden_states.ndim == 3
            and attn.spatial_norm is None and not (attn.training and getattr(dropout, "p", 0.0) > 0))


class TemporalGemmConv3d(nn.Conv3d):
    """An `nn.Conv3d` with kernel (3, 1, 1), stride 1, padding (1, 0, 0) computed as one GEMM over the channels-last
    stack of each frame's neighbours (see the module docstring). Set on an existing Conv3d by swapping its class,
    so the parameters, their names and the state dict stay the same."""

    max_positions = 256
    """The GEMM form only where h·w is at most this (the measured crossover, module docstring); Conv3d above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        if h * w > self.max_positions:
            return super().forward(x)
        y = F.pad(x.permute(0, 2, 3, 4, 1), (0, 0, 0, 0, 0, 0, 1, 1))  # (B, F+2, h, w, C), zero frames at the ends
        stack = torch.cat([y[:, 0:f], y[:, 1:f + 1], y[:, 2:f + 2]], dim=-1)  # [x_{f-1}, x_f, x_{f+1}]
        weight = self.weight[:, :, :, 0, 0].transpose(1, 2).reshape(self.out_channels, 3 * c)  # tap-major
        return F.linear(stack, weight, self.bias).permute(0, 4, 1, 2, 3)


def _temporal_conv(module: nn.Module) -> bool:
    return (type(module) is nn.Conv3d and module.kernel_size == (3, 1, 1) and module.stride == (1, 1, 1)
            and module.padding == (1, 0, 0) and module.dilation == (1, 1, 1) and module.groups == 1
            and module.padding_mode == "zeros")


def apply_rewrites(networks: list[nn.Module], on: bool = True, temporal_gemm: bool = False) -> dict[str, int]:
    """Rewrite (or, `on=False`, restore) every eligible attention processor of `networks`, and with `temporal_gemm`
    every (3, 1, 1) Conv3d (restored whenever it is not asked for). Call it before anything is compiled or captured.
    Returns how many modules were changed, by kind."""
    changed = {"attention": 0, "temporal_gemm": 0}
    for net in networks:
        for module in net.modules():
            if isinstance(module, Attention):
                proc = module.processor
                if on and type(proc) is AttnProcessor2_0:
                    module.processor = _SHARED
                    changed["attention"] += 1
                elif not on and isinstance(proc, SingleKeyAttnProcessor):
                    module.processor = AttnProcessor2_0()
                    changed["attention"] += 1
            elif on and temporal_gemm and _temporal_conv(module):
                module.__class__ = TemporalGemmConv3d
                changed["temporal_gemm"] += 1
            elif not (on and temporal_gemm) and type(module) is TemporalGemmConv3d:
                module.__class__ = nn.Conv3d
                changed["temporal_gemm"] += 1
    return changed


_SHARED = SingleKeyAttnProcessor()
"""One processor object for every rewritten attention module (compiled regions guard on the object)."""
