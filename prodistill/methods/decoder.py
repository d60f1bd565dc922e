"""Decoder distillation (`prodistill train-decoder`, `--method decoder`): a tiny temporal decoder
(`prodistill.models.tiny_decoder`) learns to reproduce the teacher's full temporal VAE decoder on the latents of
the training videos (or of the latent cache), on the shared trainer.

Loss per micro-batch, against the full decoder's frames D(z) of the same latents z (no gradient):

    L = ‖d(z) − D(z)‖₁ + λ_t·‖Δ_t d(z) − Δ_t D(z)‖₁

with Δ_t the difference of neighbouring frames (the temporal term that keeps the small decoder from
flickering; `--decoder-temporal-weight`, default 1). The latents are the VAE posterior samples the other methods
train on. No perceptual term: LPIPS needs weights we cannot fetch; `prodistill eval-decoder` reports LPIPS-free
figures (PSNR, SSIM, flicker) and what a user with real weights should add is said in README.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from prodistill.methods.base import Method, StepOutput
from prodistill.models.tiny_decoder import TinyTemporalDecoder, parse_channels


def temporal_difference(frames: Tensor) -> Tensor:
    """Δ_t of (B, F, ...) frames: (B, F−1, ...)."""
    return frames[:, 1:] - frames[:, :-1]


class DecoderDistill(Method):
    name = "decoder"
    phases = ("decoder",)

    @classmethod
    def check(cls, cfg) -> None:
        parse_channels(cfg.decoder_channels)

    def __init__(self, cfg, models, stage: int, generator: torch.Generator):
        if stage != 2:
            raise ValueError("decoder distillation is single-stage and runs as stage 2")
        self.cfg, self.models, self.generator = cfg, models, generator
        self.decoder: nn.Module = TinyTemporalDecoder(parse_channels(cfg.decoder_channels), cfg.frames,
                                                      models.latent_channels).to(models.device)

    def parameters(self, phase: str) -> list[nn.Parameter]:
        return list(self.decoder.parameters())

    def latents(self, batch: dict, generator: torch.Generator) -> Tensor:
        """The scaled latents of a batch: posterior samples of its clips, or of the latent cache's entries."""
        m = self.models
        if "latent_mean" in batch:
            mean, std = (batch[k].to(m.device, torch.float32) for k in ("latent_mean", "latent_std"))
            return m.sample_latents(mean, std, generator)
        return m.encode_video(batch["pixels"], generator)

    def compute(self, phase: str, batch: dict, cache: dict[str, Tensor]) -> StepOutput:
        z = self.latents(batch, self.generator)
        with torch.no_grad():
            target = self.models.decode(z)
        with self.models.autocast():
            pred = self.decoder(z).float()
        pixel = (pred - target).abs().mean()
        temporal = (temporal_difference(pred) - temporal_difference(target)).abs().mean()
        loss = pixel + self.cfg.decoder_temporal_weight * temporal
        return StepOutput(loss, {"loss/pixel": pixel.detach(), "loss/temporal": temporal.detach(),
                                 "loss/g_total": loss.detach()})

    def weights(self) -> dict[str, dict[str, Tensor]]:
        return {"decoder": {k: v.detach() for k, v in self.decoder.state_dict().items()}}

    def load_weights(self, weights: dict[str, dict[str, Tensor]]) -> None:
        self.decoder.load_state_dict(weights["decoder"])

    def train(self, mode: bool = True) -> None:
        self.decoder.train(mode)

    @torch.no_grad()
    def preview(self, batch: dict, generator: torch.Generator) -> Tensor:
        """Full decoder | tiny decoder, side by side, for the batch's first clip."""
        z = self.latents({k: v[:1] for k, v in batch.items()}, generator)
        return torch.cat([self.models.decode(z), self.decoder(z).float().clamp(-1, 1)], dim=-1)


def save_decoder_folder(run_dir: Path) -> Path:
    """RUN/decoder: the tiny decoder of the run's latest checkpoint as a standalone folder (config + weights)."""
    from prodistill.training.checkpoint import latest_checkpoint, load_weights

    ckpt = latest_checkpoint(Path(run_dir) / "stage2")
    if ckpt is None:
        raise ValueError(f"{run_dir} holds no decoder checkpoint: pass the --out folder of `prodistill train-decoder`")
    state = load_weights(ckpt, torch.device("cpu"))["decoder"]
    config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    decoder = TinyTemporalDecoder(parse_channels(config["decoder_channels"]), config["frames"],
                                  state["conv_in.weight"].shape[1])
    decoder.load_state_dict(state)
    return decoder.save(Path(run_dir) / "decoder")
