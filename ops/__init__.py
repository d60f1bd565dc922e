"""Fused CUDA ops registered through torch.library, each with a pure-torch reference (SPEC §4): the
PixelShuffle latent upsampler and the pseudo-Huber loss. Filled by the fused-ops issue; the pure-torch
versions in use today are `prodistill.models.discriminator.LatentUpsampler` and
`prodistill.diffusion.losses.pseudo_huber`."""
