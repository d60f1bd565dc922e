"""One image → one video with the exported graphs, exactly as `prodistill sample --steps 1 [--tts]` does it
in torch (`prodistill.sampling.generate_video`), step for step:

1. the image is cover-resized and centre-cropped to the export's resolution, in [−1, 1];
2. conditioning as `SVDModels.condition`: the CLIP embedding of the clean frame, the VAE latent mode of the
   frame plus `noise_aug_strength`·noise repeated over frames, added_time_ids = [fps − 1, motion, aug];
3. the 1-step consistency sampler, or TTS (OSV eq. 13, NFE 2), on the exported denoiser D(x, σ) with the
   manifest's σ (the same values `sample_student` uses);
4. the temporal decoder, clamp, uint8.

Noise comes from numpy's generator (seeded), or is passed in: torch's generator cannot be reproduced
without torch, so parity with `prodistill sample` is tested by feeding both sides the same noise arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export.runtime.backends import Backend, open_backend
from export.runtime.image import clip_pixels, load_image, to_uint8_frames
from export.runtime.manifest import Manifest
from export.runtime.sampler import generator_sample, one_step, time_travel


@dataclass
class Noise:
    """Every random draw of a generation."""

    augmentation: np.ndarray
    """(1, 3, H, W) noise added to the conditioning frame (scaled by noise_aug_strength)."""
    latents: np.ndarray
    """(1, F, 4, h, w) ε of the sampler (x = σ_max·ε)."""
    fresh: list[np.ndarray] = field(default_factory=list)
    """A k-step generator's fresh ε between steps (k − 1 draws; none for a consistency student)."""

    @classmethod
    def draw(cls, manifest: Manifest, seed: int) -> "Noise":
        """In this order, so a seed's first draws do not depend on the sampler: augmentation, ε, fresh ε."""
        rng = np.random.default_rng(seed)
        aug = rng.standard_normal((1, 3, manifest.height, manifest.width), dtype=np.float32)
        latents = rng.standard_normal(tuple(manifest.latent_shape), dtype=np.float32)
        fresh = [rng.standard_normal(tuple(manifest.latent_shape), dtype=np.float32)
                 for _ in range(max(len(manifest.sigmas_generator) - 1, 0))]
        return cls(aug, latents, fresh)


class OneStepPipeline:
    """The exported student, its encoders and decoder behind one backend."""

    def __init__(self, folder: str | Path, backend: str | Backend = "ort", device: str = "auto"):
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        self.backend = backend if not isinstance(backend, str) else open_backend(backend, self.folder,
                                                                                 self.manifest, device)

    def encode(self, image_nchw: np.ndarray, aug_noise: np.ndarray, fps: float | None = None,
               motion_bucket_id: int | None = None) -> dict[str, np.ndarray]:
        """First frame (1, 3, H, W) in [−1, 1] → the denoiser's condition inputs (as `SVDModels.condition`);
        fps and motion bucket default to the manifest's (the values the student was trained with)."""
        m = self.manifest
        fps = m.fps if fps is None else fps
        motion_bucket_id = m.motion_bucket_id if motion_bucket_id is None else motion_bucket_id
        embeds = self.backend.run("image_encoder", {
            "pixel_values": clip_pixels(image_nchw, m.clip_size, m.clip_mean, m.clip_std)})["image_embeds"]
        augmented = image_nchw + np.float32(m.noise_aug_strength) * aug_noise
        latent = self.backend.run("vae_encoder", {"image": augmented})["image_latent"]
        frames = m.latent_shape[1]
        return {
            "image_embeds": embeds,
            "image_latents": np.ascontiguousarray(np.broadcast_to(latent[:, None], (1, frames, *latent.shape[1:]))),
            "added_time_ids": np.array([[fps - 1, motion_bucket_id, m.noise_aug_strength]], np.float32),
        }

    def sample(self, cond: dict[str, np.ndarray], noise_latents: np.ndarray, tts: bool,
               fresh: list[np.ndarray] | None = None) -> np.ndarray:
        """Scaled latents (1, F, 4, h, w) from the student: 1 step, or TTS (NFE 2); a few-step generator's k
        steps with `fresh` noise between them."""
        m = self.manifest

        def denoise(x: np.ndarray, sigma: float) -> np.ndarray:
            feeds = {"x": x, "sigma": np.array([sigma], np.float32), **cond}
            return self.backend.run("denoiser", feeds)["denoised"]

        if m.sampler == "generator":
            if tts:
                raise ValueError("--tts is the Time Travel Sampler of consistency students (OSV eq. 13); this export "
                                 f"is a {len(m.sigmas_generator)}-step generator: generate without --tts")
            return generator_sample(denoise, noise_latents, fresh or [], m.sigmas_generator)
        param = (m.cm_sigma_data, m.cm_scale)
        if tts:
            return time_travel(denoise, noise_latents, *m.sigmas_tts, sigma_min=m.sigma_min, param=param)
        return one_step(denoise, noise_latents, m.sigmas_1step[0], sigma_min=m.sigma_min, param=param)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Scaled latents → pixels (1, F, 3, H, W) in [−1, 1]."""
        return self.backend.run("decoder", {"latents": latents})["pixels"]

    def generate_pixels(self, image_nchw: np.ndarray, noise: Noise, tts: bool = False, fps: float | None = None,
                        motion_bucket_id: int | None = None) -> np.ndarray:
        cond = self.encode(image_nchw, noise.augmentation, fps, motion_bucket_id)
        return self.decode(self.sample(cond, noise.latents, tts, noise.fresh))

    def generate(self, image: str | Path, out: str | Path, tts: bool = False, seed: int = 0,
                 noise: Noise | None = None) -> Path:
        """`prodistill generate`: image file → mp4 (H.264)."""
        m = self.manifest
        pixels = self.generate_pixels(load_image(image, m.width, m.height), noise or Noise.draw(m, seed), tts)
        return write_mp4(Path(out), to_uint8_frames(pixels[0]), m.fps)


def write_mp4(path: Path, frames_fhwc: np.ndarray, fps: float) -> Path:
    """H.264 yuv420p mp4 through PyAV, with the training side's encoder settings (crf 17)."""
    from fractions import Fraction

    import av

    rate = Fraction(fps).limit_denominator(1001)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        # mbtree=0: the same frames give the same file (x264's macroblock tree did not, in PyAV 17-18.1 wheels)
        stream = container.add_stream("libx264", rate=rate, options={"crf": "17", "preset": "medium",
                                                                     "x264-params": "mbtree=0"})
        stream.width, stream.height, stream.pix_fmt = frames_fhwc.shape[2], frames_fhwc.shape[1], "yuv420p"
        for index, rgb in enumerate(frames_fhwc):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path
