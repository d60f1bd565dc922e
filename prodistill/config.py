"""The training configuration: one typed dataclass whose field docstrings are the CLI's `--help`.

Precedence, lowest first: the paper's defaults written here < a method's own (`METHOD_DEFAULTS`) < the
preset's own defaults (the tiny preset trains for seconds, not days) < a YAML file (`--config`) <
command-line flags. Every run writes the resolved result to `RUN/config.yaml`; `--resume` and `prodistill
sample` read it back from there.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from prodistill.methods import METHODS
from prodistill.models.presets import PRESETS, get_preset


def _f(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "mcm": dict(disc_lr=5e-5),
    "avdm2": dict(lr=4e-6, disc_lr=2e-5, warmup_steps=500, weight_decay=0.01, stage2_steps=10000),
}
"""Where a method's paper differs from the field defaults (which are OSV's); presets, YAML and flags override.
AVDM2 §5.1: AdamW, 4e-6 for the generator's spatial weights (× `motion_lr_scale` for its temporal ones), 2e-5 for
the discriminator and the fake score, weight decay 0.01, 500 warm-up steps, evaluated at 10K iterations."""


@dataclass(kw_only=True)
class TrainConfig:
    # -- what to run ---------------------------------------------------------------------------------
    method: str = _f("osv", "Distillation method: osv (two stages), lcm (the plain latent consistency distillation "
                     "baseline), mcm (motion consistency model: LCM on a motion representation + a frame "
                     "discriminator + mixed trajectories), avdm2 (few-step generator: video adversarial + 2D score "
                     "distribution matching), decoder (not a student: a tiny temporal VAE decoder distilled from the "
                     "teacher's, as `prodistill train-decoder` runs it).", choices=tuple(METHODS))
    stage: str = _f("both", "OSV stage to train: 1 (latent GAN pretraining), 2 (adversarial consistency "
                    "distillation) or both in sequence. Single-stage methods ignore it.",
                    choices=("1", "2", "both"))
    preset: str = _f("tiny", "Architecture when no weights are given: tiny (CPU, random init) or svd-xt "
                     "(full size, random init, for benchmarks).", choices=tuple(PRESETS))
    teacher: str | None = _f(None, "Teacher weights: a diffusers SVD folder (unet/, vae/, image_encoder/, "
                             "feature_extractor/) or a hub id. Default: random init of --preset.")
    dino: str | None = _f(None, "DINOv2 weights for the discriminator (transformers folder or hub id). "
                          "Default: random init of --preset's DINOv2 architecture.")
    data: str | None = _f(None, "Videos to train on: a folder, or a .csv/.jsonl manifest with one row per video "
                          "(OpenVid-1M's CSV works as is). Default: the built-in clips.")
    video_root: str | None = _f(None, "Folder that relative paths in a --data manifest are relative to "
                                "(default: the manifest's folder).")
    out: str = _f("runs/osv", "Run folder: resolved config, logs, checkpoints and sample videos.")
    resume: bool = _f(False, "Continue the run in --out from its latest checkpoint.")
    device: str = _f("auto", "cpu, cuda, or auto (cuda when available).", choices=("auto", "cpu", "cuda"))
    dtype: str = _f("auto", "Weights/compute precision of frozen models: fp32, bf16, fp16, or auto "
                    "(bf16 on cuda, fp32 on cpu). Trainable tensors stay fp32.",
                    choices=("auto", "fp32", "bf16", "fp16"))
    seed: int = _f(0, "Seed of every random draw (data order, noise, timesteps).")
    # -- data -------------------------------------------------------------------------------------------
    resolution: str | None = _f(None, "Training resolution WxH in pixels (default: the preset's); with "
                                "--resolution-schedule, the distillation stage's first one.")
    stage1_resolution: str | None = _f(None, "OSV stage 1's resolution WxH (default: --resolution; the paper's "
                                       "recipe: 1024x768).")
    resolution_schedule: str | None = _f(None, "Resolution switches within the distillation stage (OSV's stage 2, "
                                         "the only stage of the other methods): comma-separated STEP:WxH, e.g. "
                                         "10000:1024x768 trains from step 10000 on at 1024x768 (the OSV paper's last "
                                         "10K of 20K steps). The data order and random streams carry on, resume is "
                                         "exact, compiled regions compile once for the new shapes and CUDA graphs "
                                         "are captured again.")
    frames: int = _f(14, "Frames per clip.")
    fps: float = _f(7.0, "Frame rate clips are sampled at (SVD conditions on fps − 1).")
    decoder: str = _f("auto", "Video decoding: dali (NVIDIA DALI, on the GPU when --device is cuda), pyav (CPU), "
                      "or auto (dali when it is installed and a GPU is used).", choices=("auto", "dali", "pyav"))
    batch_size: int = _f(1, "Clips per micro-batch (per GPU).")
    grad_accum: int = _f(1, "Micro-batches accumulated per optimiser step.")
    num_workers: int = _f(0, "Data loader worker processes.")
    # -- schedule ---------------------------------------------------------------------------------------
    max_steps: int | None = _f(None, "Optimiser steps for each selected stage (overrides --stage1-steps "
                               "and --stage2-steps).")
    stage1_steps: int = _f(2000, "Stage-1 (LGP) optimiser steps (paper: 2K).")
    stage2_steps: int = _f(20000, "Stage-2 (ACD) optimiser steps (paper: 20K).")
    lr: float = _f(5e-6, "Student learning rate (paper: 5e-6, Adam).")
    disc_lr: float = _f(5e-6, "Discriminator learning rate; AVDM2: also the 2D fake score's (method defaults: mcm "
                        "5e-5, avdm2 2e-5, their papers').")
    warmup_steps: int = _f(100, "Linear learning-rate warm-up steps.")
    grad_clip: float = _f(1.0, "Gradient-norm clipping threshold (0 disables).")
    weight_decay: float = _f(0.0, "AdamW weight decay of every optimiser (AVDM2's paper: 0.01).")
    # -- method -----------------------------------------------------------------------------------------
    lora_rank: int = _f(64, "LoRA rank of the student.")
    lora_alpha: float | None = _f(None, "LoRA alpha (default: the rank).")
    lora_targets: str = _f("to_q,to_k,to_v,to_out.0", "Comma-separated module names that get LoRA.")
    train_modules: str = _f("", "Stage 2: comma-separated regexes of UNet parameter names trained in full "
                            "besides LoRA (e.g. temporal_transformer_blocks).")
    num_timesteps: int = _f(100, "Discrete training timesteps on the Karras σ grid (paper: 100).")
    solver_steps: int = _f(5, "m: teacher PF-ODE Euler steps per consistency target (OSV eq. 8; paper: 5).")
    guidance_min: float = _f(1.0, "Teacher CFG scale on the first frame during distillation.")
    guidance_max: float = _f(3.0, "Teacher CFG scale on the last frame (linear in between, as SVD).")
    lambda_lgp: float = _f(0.1, "λ_LGP, weight of the adversarial term in stage 1 (OSV eq. 7).")
    lambda_acd: float = _f(0.1, "λ_ACD, weight of the adversarial term in stage 2 (OSV eq. 10).")
    huber_c: float | None = _f(None, "c of the pseudo-Huber distance (default 0.00054·√d, as iCT).")
    ema_decay: float = _f(0.95, "EMA decay μ of the consistency target θ⁻.")
    disc_input: str = _f("latent", "What the discriminator sees: latent (upsampled latents, the paper's "
                         "design) or decoded (VAE-decoded frames, the paper's ablation).",
                         choices=("latent", "decoded"))
    disc_upscale: int = _f(4, "PixelShuffle factor r of the latent upsampler.")
    disc_head_channels: int = _f(64, "Width of the discriminator's spatial and temporal heads.")
    # -- MCM --------------------------------------------------------------------------------------------
    motion_repr: str = _f("learned", "MCM: what the consistency loss compares (MCM eq. 6): learned (a per-frame "
                          "channel-MLP head, EMA copy on the target; the paper's best), diff (consecutive-frame "
                          "latent difference), corr (consecutive-frame correlation volume, quadratic in latent "
                          "pixels), lowfreq / highfreq (FreeInit's space-time low / high-pass), raw (the latents).",
                          choices=("learned", "diff", "corr", "lowfreq", "highfreq", "raw"))
    image_data: str | None = _f(None, "MCM: folder of high-quality images that the frame discriminator treats as "
                                "real (default: frames of the training videos).")
    lambda_real: float = _f(0.5, "MCM: λ_real, probability that a batch's trajectory starts from its real latents "
                            "rather than from the student's own 1-step sample (MCM eq. 7-9; paper: 0.5).")
    lambda_adv: float = _f(1.0, "MCM: λ_adv, weight of the frame discriminator's generator term (MCM eq. 9; "
                           "paper: 1).")
    disc_frames: int = _f(2, "MCM: l, random frames per clip that the image discriminator judges (MCM eq. 4-5; "
                          "the authors' scripts: 2).")
    disc_loss: str = _f("hinge", "MCM: discriminator loss: hinge (the paper's eq. 5) or wgan (the authors' "
                        "released scripts: WGAN with each logit's term floored at -1).", choices=("hinge", "wgan"))
    disc_gp: float = _f(1e-5, "MCM: weight of the gradient penalty (‖∇D‖ − 1)² on the discriminator's DINOv2 "
                        "features at real/fake interpolates (the authors' scripts: 1e-5; 0 turns it off).")
    # -- conditioning -----------------------------------------------------------------------------------
    motion_bucket_id: int = _f(127, "SVD motion bucket conditioning.")
    noise_aug_strength: float = _f(0.02, "Noise added to the conditioning frame (SVD).")
    # -- AVDM2 (its paper's values unless noted; see README "AVDM2") -----------------------------------
    student_steps: int = _f(4, "AVDM2: steps k of the few-step generator (1-4), trained by backward simulation; "
                            "`prodistill sample` uses it by default (paper: 4).")
    critic_steps: int = _f(2, "AVDM2: discriminator and 2D fake-score updates per generator update (paper: 2).")
    sdm_frames: int = _f(4, "AVDM2: K random frames per video for 2D score distribution matching (paper: K "
                         "unstated).")
    image_teacher: str | None = _f(None, "AVDM2: 2D teacher, a diffusers Stable Diffusion folder (unet/, "
                                   "scheduler/, text_encoder/, tokenizer/; SD latent space) used with the empty "
                                   "prompt. Default: the video teacher on single frames.")
    lambda_adm: float = _f(1.0, "AVDM2: λ_ADM, weight of the video adversarial term (eq. 9; paper: unstated).")
    lambda_sdm: float = _f(1.0, "AVDM2: λ_SDM, weight of the 2D score distribution matching term (eq. 9; paper: "
                           "unstated).")
    adm_t_min: float = _f(0.0, "AVDM2: lower end of the adversarial noise range as a fraction of T, the paper's "
                          "1000-step SD DDPM schedule (paper: t ~ U[0, 0.5T], σ 0.029-1.62).")
    adm_t_max: float = _f(0.5, "AVDM2: upper end of the adversarial noise range (fraction of T).")
    sdm_t_min: float = _f(0.2, "AVDM2: lower end of the 2D score matching and fake-score noise range, as a "
                          "fraction of T (paper: t ~ U[0.2T, 0.98T], σ 0.57-13.0).")
    sdm_t_max: float = _f(0.98, "AVDM2: upper end of the 2D score matching noise range (fraction of T).")
    motion_lr_scale: float = _f(5.0, "AVDM2: learning rate of the generator's temporal (motion) parameters as a "
                                "multiple of --lr (paper: 2e-5 motion vs 4e-6 spatial).")
    # -- speed (prodistill.accel applies these in one written order) -----------------------------------
    compile: str = _f("auto", "torch.compile by region (UNet res-blocks and attention models, DINOv2 layers, "
                      "discriminator heads): on (every network: fastest step and least memory; measured on an H200 at "
                      "512²: at full speed 89 s after the first start of a configuration, the steps running eagerly "
                      "meanwhile, and a 17 s first step from the cache after; see --compile-workers), teacher (only "
                      "the frozen teacher's forward: ~30 s to compile), off, or auto (on for cuda, off for cpu). "
                      "Compiled kernels are cached in --compile-cache.", choices=("auto", "teacher", "on", "off"))
    cuda_graphs: str = _f("auto", "Replay the frozen teacher's m-step guided solve (and, in a single process, the "
                          "EMA target's forward) as CUDA graphs: on, off, or auto (on for cuda).",
                          choices=("auto", "on", "off"))
    exact_rewrites: str = _f("auto", "Run the SVD UNet's cross-attention to its one CLIP token as what it exactly "
                             "is, the projected value (a softmax over one key is 1): measured on an H200 at 512², 5-8 % "
                             "less time per step and 3 GB less memory. on, off, or auto (on in a single process; with "
                             "several, DDP would wait for the zero gradients of the skipped query/key projections).",
                             choices=("auto", "on", "off"))
    channels_last: bool = _f(False, "Channels-last (NHWC) weights for the 2-D convolutions (cuDNN then runs them "
                             "without transposing each NCHW input). Off by default: measured on an H200 (SVD-XT, "
                             "512², compiled and graphed) no faster, 0.943 vs 0.936 s/it.")
    compile_cache: str | None = _f(None, "Folder of torch.compile's on-disk caches (default: "
                                   "~/.cache/prodistill/compile, or under $XDG_CACHE_HOME).")
    compile_workers: int = _f(-1, "Ahead-of-time compilation of the regions: each region variant is compiled once, "
                              "in this many processes at once (in the background while the steps run eagerly, when "
                              "more than one), and saved in --compile-cache, so that later launches "
                              "load it without tracing (-1: auto, half the CPU cores up to 8 on cuda, 1 on cpu; "
                              "0: just-in-time torch.compile in this process, as before).")
    fused_ops: bool = _f(False, "Run the discriminator's latent upsampler and the pseudo-Huber loss as the fused "
                         "Triton kernels of ops/ (cuda only; off by default: measured slower or no faster than "
                         "torch on an H100).")
    split_cfg: str = _f("auto", "Run the teacher's guided solve as two batch-B calls (unconditional, conditional) "
                        "instead of one of 2B: the compiled teacher then shares the batch-B graphs of the EMA target's "
                        "unchanged blocks (24 fewer region variants to compile and load at 512x512; measured on an "
                        "H200 no slower, 0.884 vs 0.910 s/it). auto: on when every network is compiled (--compile "
                        "auto/on on cuda), off otherwise.", choices=("auto", "on", "off"))
    grad_checkpointing: bool = _f(False, "Recompute the student's UNet activations in the backward pass: less "
                                  "memory, about one more student forward of time.")
    fp8: bool = _f(False, "FP8 GEMMs for the Linear layers of teacher, student and DINOv2, each layer only where the "
                   "measured per-shape table (--fp8-table) says FP8 beats bf16 by at least 5 %; convs stay bf16. "
                   "Needs an H100/H200 and the backend's package (pip install '.[fp8]').")
    fp8_backend: str = _f("auto", "FP8 library: te (Transformer Engine, eager networks only: te.Linear is a graph "
                          "break under torch.compile), torchao (float8, fused by torch.compile), auto (per layer, "
                          "the installed one the table finds faster), or emulate (plain-torch FP8 numerics on any "
                          "device, slower than bf16: for checking numerics).",
                          choices=("auto", "te", "torchao", "emulate"))
    fp8_table: str | None = _f(None, "The measured per-shape FP8 table (JSON written by `prodistill bench fp8`); "
                               "default: the one shipped in the package.")
    # -- many GPUs (`torchrun --nproc-per-node N -m prodistill train ...`; ignored in a single process) -------
    parallel: str = _f("ddp", "How ranks share the trainable networks: ddp (each rank holds them all; gradients "
                       "averaged) or fsdp (FSDP2: the student's trainable parameters, gradients and Adam state "
                       "sharded across ranks — for large --train-modules; frozen weights are never sharded).",
                       choices=("ddp", "fsdp"))
    dist_timeout: float = _f(600.0, "Seconds a collective waits for the other ranks before the job fails (a dead "
                             "or hung rank ends the run with an error instead of a hang).")
    # -- bookkeeping ------------------------------------------------------------------------------------
    log_every: int = _f(10, "Steps between log lines (the only host synchronisation in the loop).")
    ckpt_every: int = _f(500, "Steps between checkpoints (one is always written at the end of a stage).")
    keep_ckpts: int = _f(3, "Checkpoints kept per stage.")
    sample_every: int = _f(1000, "Steps between preview videos (0: only at the end of a stage).")
    decoder_channels: str = _f("64,64,64,32", "--method decoder (`prodistill train-decoder`): widths of the tiny "
                               "temporal decoder's four stages (8× upsampling).")
    decoder_temporal_weight: float = _f(1.0, "--method decoder: weight of the temporal-difference term (keeps the "
                                        "tiny decoder from flickering).")
    cm_scale: float = _f(1.0, "Timestep scaling s of the consistency coefficients (LCM's form): c_skip = "
                         "σd²/((s(σ−σmin))²+σd²), c_out = σd·s(σ−σmin)/√((sσ)²+σd²); the boundary f(x, σmin) = x "
                         "stays exact, larger s hands the few-step samplers' σ to the network sooner (LCM's code "
                         "uses 10, MCM's 4). 1: Song et al.'s coefficients.")
    cm_sigma_data: float = _f(1.0, "σ_data of the consistency coefficients (1: SVD's latents, whose EDM "
                              "preconditioning uses σ_data = 1).")
    val_data: str | None = _f(None, "Held-out videos (folder or manifest) to validate on: the student's FVD, CLIP "
                              "similarity to the conditioning image and temporal consistency, logged as val/* "
                              "metrics; the best checkpoint by FVD is marked (RUN/val/best.json).")
    val_every: int = _f(0, "Steps between validations with --val-data (0: only at the end of each stage); a "
                        "validation step that is not a checkpoint step writes one.")
    val_videos: int = _f(8, "Clips of --val-data in the fixed validation set.")
    val_i3d: str | None = _f(None, "I3D TorchScript file for the validation FVD (default: the random-init stand-in "
                             "of `prodistill eval`, comparable only within a run).")
    tensorboard: bool = _f(False, "Also log to TensorBoard (needs the tensorboard package).")

    # ------------------------------------------------------------------------------------------------
    def resolve(self, explicit: set[str]) -> "TrainConfig":
        """Apply the method's and then the preset's defaults to every field the user did not set, then validate."""
        defaults = {**METHOD_DEFAULTS.get(self.method, {}), **get_preset(self.preset).train_defaults}
        for key, value in defaults.items():
            if key not in explicit:
                setattr(self, key, value)
        if self.resolution is None:
            w, h = get_preset(self.preset).resolution
            self.resolution = f"{w}x{h}"
        if self.max_steps is not None:
            self.stage1_steps = self.stage2_steps = self.max_steps
        if isinstance(self.split_cfg, bool):  # a run folder's config.yaml from before auto existed
            self.split_cfg = "on" if self.split_cfg else "off"
        self.validate()
        return self

    def validate(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"--{_flag(f.name)} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        if self.max_steps is not None and self.max_steps < 1:  # resolve() copied it into the stage steps
            raise ValueError(f"--max-steps must be at least 1, got {self.max_steps}")
        self.size()
        if self.stage1_resolution is not None:
            _parse_size(self.stage1_resolution, "--stage1-resolution")
        if 2 in self.stages():  # a stage-1-only run never reads the schedule
            self.resolution_switches()
        if self.cm_scale <= 0 or self.cm_sigma_data <= 0:
            raise ValueError(f"--cm-scale and --cm-sigma-data must be positive, got {self.cm_scale} and "
                             f"{self.cm_sigma_data}")
        if self.val_every < 0:
            raise ValueError(f"--val-every must be 0 or more, got {self.val_every}")
        if self.val_every and not self.val_data:
            raise ValueError("--val-every needs --val-data: pass a folder or manifest of held-out videos")
        if self.val_data and self.val_videos < 2:
            raise ValueError(f"--val-videos must be at least 2 (FVD compares two sets of videos), got {self.val_videos}")
        positive = ("frames", "batch_size", "grad_accum", "num_timesteps", "solver_steps", "log_every",
                    "ckpt_every", "keep_ckpts", "disc_upscale", "disc_head_channels", "stage1_steps", "stage2_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("seed", "num_workers", "warmup_steps", "sample_every", "lora_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)} must be 0 or more, got {getattr(self, name)}")
        for name in ("fps", "lr", "disc_lr", "huber_c", "lora_alpha"):  # `not > 0` also refuses nan
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        if self.lora_rank == 0 and self.method != "decoder" and (not self.train_modules or 1 in self.stages()
                                                                 or self.method == "avdm2"):
            # the LoRA-less students of OSV's stage 1 and of AVDM2's fake score would train nothing
            raise ValueError("--lora-rank 0 leaves the student nothing to train: give a rank of 1 or more, or "
                             "--train-modules (read by the distillation stage of osv, lcm and mcm only)")
        if self.compile_workers < -1:
            raise ValueError(f"--compile-workers must be -1 (auto), 0 (just in time) or a number of processes, got "
                             f"{self.compile_workers}")
        if self.frames < 2:
            raise ValueError(f"--frames must be at least 2 for a video, got {self.frames}")
        if self.solver_steps >= self.num_timesteps:
            raise ValueError(f"--solver-steps ({self.solver_steps}) must be smaller than --num-timesteps "
                             f"({self.num_timesteps})")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.lambda_real <= 1:
            raise ValueError(f"--lambda-real is a probability: it must be in [0, 1], got {self.lambda_real}")
        for name in ("lambda_lgp", "lambda_acd", "lambda_adv", "lambda_adm", "lambda_sdm", "disc_gp",
                     "decoder_temporal_weight", "weight_decay", "grad_clip", "noise_aug_strength", "motion_lr_scale"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{_flag(name)} must not be negative, got {getattr(self, name)}")
        if not 1 <= self.disc_frames <= self.frames:
            raise ValueError(f"--disc-frames must be between 1 and --frames ({self.frames}), got {self.disc_frames}")
        if self.image_data is not None and self.method != "mcm":
            raise ValueError("--image-data is read only by --method mcm; leave it out or choose mcm")
        if self.dist_timeout <= 0:
            raise ValueError(f"--dist-timeout must be a positive number of seconds, got {self.dist_timeout}")
        if self.method == "avdm2":
            self._validate_avdm2()
        for name in ("teacher", "dino", "image_teacher"):
            _check_weights_arg(name, getattr(self, name))
        if self.fp8_table is not None and not Path(self.fp8_table).expanduser().is_file():
            raise ValueError(f"--fp8-table {self.fp8_table}: no such file; pass the JSON that `prodistill bench fp8 "
                             "--json` wrote, or leave it out for the table shipped in the package")

    def _validate_avdm2(self) -> None:
        if not 1 <= self.student_steps <= min(4, self.num_timesteps):
            raise ValueError(f"--student-steps must be in [1, 4] (and at most --num-timesteps), got {self.student_steps}")
        if self.critic_steps < 1:
            raise ValueError(f"--critic-steps must be at least 1, got {self.critic_steps}")
        if not 1 <= self.sdm_frames <= self.frames:
            raise ValueError(f"--sdm-frames must be in [1, --frames = {self.frames}], got {self.sdm_frames}")
        for lo, hi in (("adm_t_min", "adm_t_max"), ("sdm_t_min", "sdm_t_max")):
            a, b = getattr(self, lo), getattr(self, hi)
            if not 0 <= a <= b <= 1:
                raise ValueError(f"--{_flag(lo)} and --{_flag(hi)} must satisfy 0 <= min <= max <= 1, got {a} and {b}")

    def size(self) -> tuple[int, int]:
        """(W, H) from the `WxH` resolution string, checked to be a multiple of 16 pixels."""
        return _parse_size(self.resolution, "--resolution")

    def resolution_switches(self) -> list[tuple[int, tuple[int, int]]]:
        """`--resolution-schedule` as [(step, (W, H)), ...], steps increasing, each inside the distillation stage
        (0 < step < --stage2-steps)."""
        if not self.resolution_schedule:
            return []
        switches = []
        for entry in str(self.resolution_schedule).split(","):
            step, sep, size = entry.strip().partition(":")
            try:
                step = int(step)
            except ValueError:
                step, sep = None, ""
            if not sep:
                raise ValueError(f"--resolution-schedule entries look like 10000:1024x768 (STEP:WxH), got {entry!r}")
            switches.append((step, _parse_size(size, "--resolution-schedule")))
        steps = [s for s, _ in switches]
        if steps != sorted(set(steps)) or not 0 < steps[0] or steps[-1] >= self.stage2_steps:
            hint = (f"; --max-steps {self.max_steps} shortened the stage: give a schedule inside it, or "
                    "--resolution-schedule '' for none") if self.max_steps is not None else ""
            raise ValueError(f"--resolution-schedule steps must increase and lie between 1 and --stage2-steps - 1 "
                             f"({self.stage2_steps - 1}), got {', '.join(map(str, steps))}{hint}")
        return switches

    def size_at(self, stage: int, step: int = 0) -> tuple[int, int]:
        """(W, H) that `stage` trains at after `step` completed optimiser steps: OSV's stage 1 at
        --stage1-resolution, the distillation stage at --resolution, then at each --resolution-schedule switch
        (OSV §5's recipe: 1024x768; 576x320, then 1024x768 for the last 10K steps)."""
        if stage == 1 and self.method == "osv" and self.stage1_resolution is not None:
            return _parse_size(self.stage1_resolution, "--stage1-resolution")
        size = self.size()
        if stage == 2:
            for start, switched in self.resolution_switches():
                if step >= start:
                    size = switched
        return size

    def sizes(self) -> set[tuple[int, int]]:
        """Every (W, H) the selected stages train at."""
        return {self.size_at(s, 0) for s in self.stages()} | (
            {size for _, size in self.resolution_switches()} if 2 in self.stages() else set())

    def at_resolution(self, size: tuple[int, int]) -> "TrainConfig":
        """This config at the single resolution `size` (W, H; no stage-1 resolution, no schedule): for validating a
        stage at one size, and for using a student at the size it trained at (`prodistill.sampling.checkpoint_size`)."""
        return dataclasses.replace(self, resolution="{}x{}".format(*size), stage1_resolution=None,
                                   resolution_schedule=None)

    def stages(self) -> tuple[int, ...]:
        if self.method != "osv":
            return (2,)  # single-stage methods are consistency distillation, OSV's stage-2 slot
        return (1, 2) if self.stage == "both" else (int(self.stage),)

    def steps_for(self, stage: int) -> int:
        return self.stage1_steps if stage == 1 else self.stage2_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def csv_items(text: str) -> tuple[str, ...]:
    """The items of a comma-separated option (`--lora-targets`, `--train-modules`), blanks dropped."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _check_weights_arg(name: str, value: str | None) -> None:
    """A weights argument is a folder with the expected config files or a hub id (org/name); anything else
    is a typo, reported before any model is built."""
    if value is None:
        return
    path = Path(value).expanduser()
    if path.exists():
        if name == "teacher":
            from prodistill.models.svd import check_teacher_folder

            check_teacher_folder(path)
        elif name == "image_teacher":
            from prodistill.models.image_teacher import check_image_teacher_folder

            check_image_teacher_folder(path)
        elif not (path / "config.json").is_file():
            raise ValueError(f"--{_flag(name)} {value} is not a transformers model folder (no config.json); pass the "
                             "folder that save_pretrained wrote, or a hub id")
        return
    if not re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", value):
        raise ValueError(f"--{_flag(name)} {value}: no such folder, and not a hub id of the form org/name; "
                         "pass a local weights folder or a hub id")


def _parse_size(text: str | None, flag: str) -> tuple[int, int]:
    """(W, H) from `WxH`, checked to be positive multiples of 16 pixels (the VAE's 8× and the UNet's 2×)."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"{flag} must look like 512x320 (WxH), got {text!r}") from None
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        raise ValueError(f"{flag} {w}x{h}: width and height must be positive multiples of 16")
    return w, h


def _flag(name: str) -> str:
    return name.replace("_", "-")


RECIPES = Path(__file__).resolve().parent.parent / "configs"
"""The papers' recipes shipped in the repository (`configs/*.yaml`; the Docker train image carries them too)."""


def config_path(path: str | Path) -> Path:
    """A `--config` argument as a file: the path itself, or a recipe's name (`osv`, `mcm-tiny`, ...) in `RECIPES`."""
    given = Path(path).expanduser()
    if given.is_file():
        return given
    recipe = RECIPES / f"{given.name}.yaml"
    if str(path) == given.name and given.suffix == "" and recipe.is_file():  # a bare name, not a path
        return recipe
    names = sorted(f.stem for f in RECIPES.glob("*.yaml")) if RECIPES.is_dir() else []
    raise ValueError(f"--config {path}: no such file" + (f"; pass a YAML file or a recipe name ({', '.join(names)})"
                                                          if names else "; pass a YAML file of options"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file (or a recipe by name, `config_path`), rejecting keys that are not config fields (a typo
    should not pass silently) and converting each value to its field's type (`_yaml_value`)."""
    path = config_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        if context and mark and context.line != mark.line:
            problem += f", {getattr(e, 'context', None) or 'from'} at line {context.line + 1}"
        raise ValueError(f"{path}{where}: not valid YAML ({problem}); fix the file's syntax") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; pass a YAML file of options") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a YAML mapping of option names to values")
    known = {f.name for f in fields(TrainConfig)}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}; see `prodistill train --help`")
    return {k: _yaml_value(path, k, v) for k, v in data.items()}


_TYPES = typing.get_type_hints(TrainConfig)
_KINDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def _yaml_value(path: Path, key: str, value: Any) -> Any:
    """`value` of the YAML `key` as its field's declared type, where that is lossless and unambiguous: YAML 1.1 reads
    1e-4 (no dot) and quoted numbers as strings, 7 as an int and on/off as booleans."""
    tp = _TYPES[key]
    optional = isinstance(tp, types.UnionType) and type(None) in typing.get_args(tp)
    base = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
    choices = TrainConfig.__dataclass_fields__[key].metadata.get("choices") or ()
    if value is None and optional or type(value) is base:
        return value
    if isinstance(value, bool):
        if base is str and {"on", "off"} <= set(choices):  # `compile: on` reads as true
            return "on" if value else "off"
    elif base is str and isinstance(value, (int, float)):  # `stage: 1`
        return str(value)
    elif base is float and isinstance(value, (int, str)) and not math.isnan(_to_float(value)):
        return _to_float(value)
    elif base is int and isinstance(value, (float, str)):
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        if _to_float(value).is_integer():  # 4.0, "1e4"; 4.5 is refused, not truncated
            return int(_to_float(value))
    expected = _KINDS[base] + (" or null" if optional else "")
    got = "no value" if value is None else repr(value)
    raise ValueError(f"{path}: {key} (--{_flag(key)}) must be {expected}, got {got}; fix the value or leave the key out")


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (ValueError, OverflowError):
        return math.nan


def build_config(overrides: dict[str, Any], config_file: str | Path | None = None) -> TrainConfig:
    """YAML file (if any) overlaid with the non-None `overrides`, then resolved against the preset."""
    values = load_yaml(config_file) if config_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values).resolve(explicit=set(values))
