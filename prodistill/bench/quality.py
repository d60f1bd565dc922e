"""`prodistill bench quality`: distil students on data whose exact denoiser is known, and measure how close
each sampler lands to the true distribution.

The data are `analytic.VideoGaussianMixture` latents; the teacher is their exact denoiser; the students are
trained by the package's own methods (`LCM`, `OSV` with its latent DINOv2 discriminator — tiny random
backbone, trainable upsampler and heads — `MCM` with its learned motion head, frame discriminator on the
same backbone and mixed trajectories, and `AVDM2` with the exact frame-marginal denoiser as its 2D teacher) on
the package's `Trainer`, with its checkpoints, and sampled by the package's samplers. Every row is scored
against fresh exact samples with the same class labels:

- energy distance (E-statistic 2E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖, unbiased, 0 in expectation for exact samples),
- sliced Wasserstein-2 over random unit directions (fixed per run),
- modes covered: components whose share of the samples (nearest component by clean posterior) is at least
  half their true weight,
- in-mode: fraction of samples whose Mahalanobis distance to that component is below the 99th percentile
  of exact samples' (blurry "between modes" samples fail it; exact samples score ≈ 99 %),
- class accuracy: fraction of samples that land in a component of the class they were conditioned on.

Guidance. The benchmark distils with w = 1 (`guidance_min = guidance_max = 1`): the guided teacher then *is*
the exact class-conditional denoiser, so its ODE samples the true conditional distribution and "distance to
the truth" is well defined. w > 1 follows no distribution's score (it sharpens classes), so it would bias
every row away from the reference by an amount unrelated to distillation. Both CFG branches still run.

Protocol, identical for every method and not tuned per method: one shared OSV stage 1 that both stage-2
variants (m = 5 and m = 1) start from; every student gets the same number of generator iterations in total
(LCM, MCM, AVDM2 and "OSV without stage 1" get stage1 + stage2 iterations in their single stage); one learning
rate, batch size and student width for all; the same data order, evaluation noise and reference set for all
rows. The paper's claims are judged by energy distance, with "within noise" where the gap is under three
standard deviations of the exact-vs-exact energy distance. One seed per run: `--seed` gives another mixture,
another training and another evaluation.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from prodistill.atomic import atomic_temp, atomic_write_text
from prodistill.bench.analytic import AnalyticModels, ClassCondition, MixtureLoader, MixtureSpec, VideoGaussianMixture
from prodistill.diffusion.consistency import ConsistencyParam
from prodistill.diffusion.edm import karras_sigmas
from prodistill.diffusion.solvers import bind, edm_euler_sample

TEACHER_STEPS = (1, 2, 4, 8, 25)


@dataclass(frozen=True)
class BenchSettings:
    """Sizes of one benchmark run. `QUICK` and `FULL` are the two that `prodistill bench quality` offers."""

    name: str
    batch_size: int
    """Clips per training step, every method."""
    stage1_steps: int
    """OSV stage-1 (LGP) iterations."""
    stage2_steps: int
    """OSV stage-2 (ACD) iterations; LCM, MCM, AVDM2 and OSV-without-stage-1 get stage1 + stage2."""
    eval_samples: int
    """Generated and reference samples per row."""
    lr: float = 5e-4
    """Adam learning rate of the students and the discriminator."""
    hidden: int = 256
    """Width of the students' correction MLP."""
    disc_head_channels: int = 32
    """Width of the discriminator heads (the temporal heads dominate the step time on CPU)."""
    projections: int = 256
    """Directions of the sliced Wasserstein distance."""
    noise_pairs: int = 4
    """Extra exact sample sets drawn to estimate the metrics' sampling noise."""
    cm_scale: float = 1.0
    """Timestep scaling of the consistency coefficients (`--cm-scale`) of every consistency student."""
    cm_sigma_data: float = 1.0
    """σ_data of the consistency coefficients (`--cm-sigma-data`)."""
    overrides: tuple[tuple[str, object], ...] = ()
    """Other training options of every student (`--set KEY=VALUE`, e.g. huber_c=0.01, ema_decay=0.99)."""


QUICK = BenchSettings("quick", batch_size=16, stage1_steps=40, stage2_steps=150, eval_samples=1000)
"""A smoke run (2 min 23 s measured on one thread of a 2-core CPU): too short for the students to converge."""
FULL = BenchSettings("full", batch_size=16, stage1_steps=200, stage2_steps=1000, eval_samples=2000)
"""The reported run (14 min 19 s measured on one thread of a 2-core CPU)."""


@dataclass(frozen=True)
class Student:
    """One trained student of the benchmark."""

    key: str
    label: str
    method: str
    solver_steps: int
    from_stage1: bool
    samplers: tuple[tuple[int, bool], ...]
    """(steps, TTS) pairs the student is sampled with."""
    student_steps: int = 1
    """AVDM2's k: the steps its generator is trained for (backward simulation)."""


STUDENTS = (
    Student("lcm", "LCM", "lcm", 1, False, ((1, False), (2, False), (4, False))),
    Student("osv", "OSV (m=5)", "osv", 5, True, ((1, False), (1, True), (2, False))),
    Student("osv-m1", "OSV m=1", "osv", 1, True, ((1, False), (1, True))),
    Student("osv-no-stage1", "OSV w/o stage 1", "osv", 5, False, ((1, False), (1, True))),
    Student("mcm", "MCM", "mcm", 1, False, ((1, False), (2, False), (4, False))),
    Student("avdm2", "AVDM2 (k=4)", "avdm2", 1, False, ((4, False),), student_steps=4),
)

CLAIMS = (
    ("1-step OSV beats 1-step LCM", "osv/1", "lcm/1"),
    ("1-step OSV + TTS beats 1-step LCM", "osv/1+tts", "lcm/1"),
    ("OSV: TTS at 1 step (NFE 2) beats the plain 2-step sampler (NFE 2)", "osv/1+tts", "osv/2"),
    ("OSV: m = 5 beats m = 1 at equal iterations (1 step + TTS, the paper's setting)", "osv/1+tts", "osv-m1/1+tts"),
    ("OSV: m = 5 beats m = 1 at equal iterations (plain 1 step)", "osv/1", "osv-m1/1"),
    ("OSV: stage 1 helps (1 step + TTS, the paper's setting; equal total iterations)", "osv/1+tts",
     "osv-no-stage1/1+tts"),
    ("OSV: stage 1 helps (plain 1 step; equal total iterations)", "osv/1", "osv-no-stage1/1"),
    ("1-step MCM beats 1-step LCM", "mcm/1", "lcm/1"),
    ("2-step MCM beats 2-step LCM", "mcm/2", "lcm/2"),
    ("4-step MCM beats 4-step LCM", "mcm/4", "lcm/4"),
    ("4-step AVDM2 beats 4-step LCM", "avdm2/4", "lcm/4"),
)
"""(claim, row that should be better, row it is compared with), judged by energy distance. The ablations
are judged with the paper's sampler (1 step + TTS) and, separately, with the plain 1-step sampler."""


# -- metrics ------------------------------------------------------------------------------------------------
def energy_distance(x: Tensor, y: Tensor, paired: bool = False) -> float:
    """Unbiased energy distance 2E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖ between sample sets (N, ...) and (M, ...).

    paired: x[i] and y[i] share a condition (class label), as every set of the benchmark does; the cross
    term then skips i = j like the within terms do, or same-label pairs would bias it low by O(1/N).
    """
    x, y = x.double().flatten(1), y.double().flatten(1)

    def off_diagonal_mean(d: Tensor) -> Tensor:
        n = d.shape[0]
        return (d.sum() - d.diagonal().sum()) / (n * (n - 1))

    if paired and x.shape[0] != y.shape[0]:
        raise ValueError(f"paired sample sets must have equal sizes, got {x.shape[0]} and {y.shape[0]}")
    cross = torch.cdist(x, y)
    cross = off_diagonal_mean(cross) if paired else cross.mean()
    return float(2 * cross - off_diagonal_mean(torch.cdist(x, x)) - off_diagonal_mean(torch.cdist(y, y)))


def sliced_wasserstein(x: Tensor, y: Tensor, directions: Tensor) -> float:
    """Sliced Wasserstein-2 between equal-size sample sets along unit `directions` (P, D)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"sliced Wasserstein needs equal sample counts, got {x.shape[0]} and {y.shape[0]}")
    px = (x.double().flatten(1) @ directions.T).sort(0).values
    py = (y.double().flatten(1) @ directions.T).sort(0).values
    return float((px - py).pow(2).mean().sqrt())


class Evaluator:
    """Scores sample sets conditioned on `labels` against exact reference samples with the same labels."""

    def __init__(self, mixture: VideoGaussianMixture, labels: Tensor, reference: Tensor, projections: int,
                 generator: torch.Generator):
        self.mixture, self.labels, self.reference = mixture, labels, reference
        dirs = torch.randn(projections, reference[0].numel(), generator=generator, dtype=torch.float64)
        self.directions = dirs / dirs.norm(dim=1, keepdim=True)
        comp = mixture.assign(reference)
        self.in_mode_threshold = float(torch.quantile(mixture.mahalanobis2(reference, comp), 0.99))

    def __call__(self, samples: Tensor) -> dict[str, float]:
        k = self.mixture.spec.components
        comp = self.mixture.assign(samples)
        share = torch.bincount(comp, minlength=k).double() / samples.shape[0]
        covered = int((share >= 0.5 * self.mixture.log_weights.exp()).sum())
        in_mode = (self.mixture.mahalanobis2(samples, comp) <= self.in_mode_threshold).double().mean()
        class_acc = (self.mixture.component_class[comp] == self.labels).double().mean()
        return {
            "energy": energy_distance(samples, self.reference, paired=True),
            "sliced_w2": sliced_wasserstein(samples, self.reference, self.directions),
            "modes_covered": covered,
            "modes": k,
            "in_mode": float(in_mode),
            "class_acc": float(class_acc),
        }


# -- training -----------------------------------------------------------------------------------------------
def _config(settings: BenchSettings, spec: MixtureSpec, seed: int, out: Path, method: str, solver_steps: int,
            stage2_steps: int, student_steps: int = 1):
    from prodistill.config import build_config

    return build_config(dict(
        method=method, preset="tiny", device="cpu", dtype="fp32", seed=seed, out=str(out), frames=spec.frames,
        batch_size=settings.batch_size, stage1_steps=settings.stage1_steps, stage2_steps=stage2_steps,
        solver_steps=solver_steps, lr=settings.lr, disc_lr=settings.lr, warmup_steps=0,
        guidance_min=1.0, guidance_max=1.0, disc_head_channels=settings.disc_head_channels,
        log_every=50, ckpt_every=10**9, keep_ckpts=1, sample_every=0, student_steps=student_steps,
        cm_scale=settings.cm_scale, cm_sigma_data=settings.cm_sigma_data,
    ) | dict(settings.overrides))  # `--set lr=...` replaces the benchmark's value (FIXED keys are refused earlier)


def check_settings(settings: BenchSettings, seed: int, spec: MixtureSpec, keys: tuple[str, ...] | None
                   ) -> tuple[Student, ...]:
    """The students to train, after building every training config the run will use: a bad `--set` value is one
    sentence before the benchmark starts, not a traceback after its teacher rows."""
    students = select_students(keys)
    s1, s2 = settings.stage1_steps, settings.stage2_steps
    configs = [("osv", 5, s2, 1)] if any(s.from_stage1 for s in students) else []
    configs += [(s.method, s.solver_steps, s2 if s.from_stage1 else s1 + s2, s.student_steps) for s in students]
    for method, solver_steps, stage2, student_steps in configs:
        try:
            _config(settings, spec, seed, Path("unused"), method, solver_steps, stage2, student_steps)
        except ValueError as e:
            raise ValueError(f"--set {' --set '.join(f'{k}={v}' for k, v in settings.overrides)}: {e}"
                             if settings.overrides else str(e)) from e
    return students


def _train_stage(cfg, models: AnalyticModels, stage: int, run_dir: Path, init: Path | None = None):
    """One stage on the package's Trainer, seeded as `prodistill train` seeds it; `init` is a stage-1
    checkpoint to start stage 2 from (the student, EMA target and discriminator, as `run.py` does)."""
    from prodistill.methods import build_method
    from prodistill.training.checkpoint import load_weights
    from prodistill.training.logger import MetricsLogger
    from prodistill.training.trainer import Trainer

    generator = torch.Generator().manual_seed(cfg.seed + stage)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1000 * stage)
        method = build_method(cfg, models, stage, generator)
    if init is not None:
        method.load_weights(load_weights(init))
    loader = MixtureLoader(models.mixture, cfg.batch_size, cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(run_dir)
    try:
        Trainer(cfg, method, loader, stage, run_dir / f"stage{stage}", cfg.steps_for(stage), generator,
                logger).fit()
    finally:
        logger.close()
    method.train(False)
    return method


# -- the run ------------------------------------------------------------------------------------------------
def run_quality_bench(settings: BenchSettings, seed: int = 0, spec: MixtureSpec = MixtureSpec(),
                      threads: int = 1, echo: Callable[[str], None] = print,
                      students: tuple[str, ...] | None = None) -> dict:
    """Train every student (or those whose keys are in `students`), sample every row, score them; returns the
    JSON-ready result. A student's rows do not depend on which other students run (each one's training is
    seeded by `seed` alone), so a subset reproduces the full run's rows for it.

    Runs on `threads` CPU threads (restored afterwards). One thread by default: the numbers then do not
    depend on the machine's core count, and a 2-core machine shared with another job slows down about 2×
    instead of the 10-30× that oversubscribed OpenMP threads cost.
    """
    chosen = check_settings(settings, seed, spec, students)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = _run(settings, seed, spec, echo, chosen)
    finally:
        torch.set_num_threads(previous)
    return {**result, "threads": threads}


def select_students(keys: tuple[str, ...] | None) -> tuple[Student, ...]:
    """The students with these keys (all for None), in the benchmark's order; an unknown key is an error."""
    if keys is None:
        return STUDENTS
    unknown = sorted(set(keys) - {s.key for s in STUDENTS})
    if unknown:
        raise ValueError(f"unknown student(s) {', '.join(unknown)}: choose from {', '.join(s.key for s in STUDENTS)}")
    return tuple(s for s in STUDENTS if s.key in keys)


def _run(settings: BenchSettings, seed: int, spec: MixtureSpec, echo: Callable[[str], None],
         students: tuple[Student, ...]) -> dict:
    from prodistill.config import TrainConfig
    from prodistill.sampling import sample_student
    from prodistill.training.checkpoint import latest_checkpoint
    from prodistill.training.trainer import TrainingInterrupted

    started = time.perf_counter()
    mixture = VideoGaussianMixture(spec, seed)
    models = AnalyticModels(mixture, hidden=settings.hidden)
    n = settings.eval_samples
    g_eval = torch.Generator().manual_seed(seed + 17)
    labels = torch.randint(0, spec.classes, (n,), generator=g_eval)
    reference, _ = mixture.sample(labels, g_eval)
    evaluator = Evaluator(mixture, labels, reference, settings.projections, g_eval)
    exact = [mixture.sample(labels, g_eval)[0] for _ in range(1 + settings.noise_pairs)]
    noise = torch.tensor([energy_distance(x, reference, paired=True) for x in exact[1:]], dtype=torch.float64)
    cond, shape = ClassCondition(labels), (n, *spec.shape)

    def noise_seed() -> torch.Generator:  # every row starts from the same noise (paired comparisons)
        return torch.Generator().manual_seed(seed + 29)

    rows: list[dict] = []

    def add(row_id: str, label: str, group: str, steps: int, nfe: int, samples: Tensor, **extra) -> None:
        rows.append({"id": row_id, "label": label, "group": group, "steps": steps, "nfe": nfe,
                     **evaluator(samples), **extra})
        echo(f"  {label:<34} {rows[-1]['energy']:.4f}")

    echo(f"quality bench ({settings.name}, seed {seed}): {spec.components}-component video mixture "
         f"{tuple(spec.shape)}, {n} samples per row")
    add("exact", "exact samples (second draw)", "reference", 0, 0, exact[0])
    teacher_d = bind(models.denoiser(models.teacher), cond)
    for steps in TEACHER_STEPS:
        noise_x = torch.randn(shape, generator=noise_seed())
        with torch.no_grad():
            samples = edm_euler_sample(teacher_d, noise_x, karras_sigmas(steps))
        add(f"teacher/{steps}", f"teacher ODE, {steps} Euler steps", "teacher", steps, steps, samples)
    grid = TrainConfig().num_timesteps  # the students' σ grid: the bench leaves --num-timesteps at its default
    for student in students:
        if student.method == "avdm2":  # its generator before training: the teacher's D in the k-step sampler
            k = student.student_steps
            samples = sample_student(teacher_d, shape, k, False, grid, noise_seed(), models.device, consistency=False)
            add(f"{student.key}-init/{k}", f"{student.label} at 0 iterations", "teacher", k, k, samples)

    timings: dict[str, float] = {}
    training, stopped = "", None
    with tempfile.TemporaryDirectory(prefix="prodistill-quality-") as tmp:
        tmp = Path(tmp)
        s1, s2 = settings.stage1_steps, settings.stage2_steps
        stage1_ckpt = None
        try:
            if any(s.from_stage1 for s in students):
                echo(f"training the shared OSV stage 1 ({s1} iterations)")
                training = "the shared OSV stage 1"
                t0 = time.perf_counter()
                cfg = _config(settings, spec, seed, tmp / "osv-stage1", "osv", 5, s2)
                _train_stage(cfg, models, 1, tmp / "osv-stage1")
                stage1_ckpt = latest_checkpoint(tmp / "osv-stage1" / "stage1")
                timings["osv-stage1"] = time.perf_counter() - t0
            for student in students:
                training = student.label
                stage2 = s2 if student.from_stage1 else s1 + s2
                echo(f"training {student.label} ({stage2} iterations{' after stage 1' if student.from_stage1 else ''})")
                t0 = time.perf_counter()
                cfg = _config(settings, spec, seed, tmp / student.key, student.method, student.solver_steps, stage2,
                              student.student_steps)
                method = _train_stage(cfg, models, 2, tmp / student.key, stage1_ckpt if student.from_stage1 else None)
                timings[student.key] = time.perf_counter() - t0
                denoise = bind(method.student_d, cond)
                for steps, tts in student.samplers:
                    samples = sample_student(denoise, shape, steps, tts, cfg.num_timesteps, noise_seed(),
                                             models.device, consistency=method.consistency,
                                             param=ConsistencyParam.from_config(cfg))
                    suffix = "+tts" if tts else ""
                    add(f"{student.key}/{steps}{suffix}", f"{student.label}, {steps} step{'s' * (steps > 1)}"
                        f"{' + TTS' if tts else ''}", student.key, steps, steps * (2 if tts else 1), samples,
                        iterations=(s1 if student.from_stage1 else 0) + stage2)
        except TrainingInterrupted:  # its checkpoints are about to go with `tmp`: no --resume; the rows so far stay
            stopped = f"stopped by a signal while training {training}"
    timings["total"] = time.perf_counter() - started
    return {
        **({"interrupted": stopped} if stopped else {}),
        "settings": asdict(settings),
        "seed": seed,
        "students": [s.key for s in students],
        "mixture": asdict(spec),
        "guidance": 1.0,
        "noise": {"energy_exact_mean": float(noise.mean()), "energy_exact_sd": float(noise.std())},
        "rows": rows,
        "claims": judge_claims(rows, float(noise.std())),
        "seconds": timings,
    }


def judge_claims(rows: list[dict], noise_sd: float) -> list[dict]:
    """Each paper claim as better/compared energy distances and a verdict; a difference below three
    standard deviations of the exact-vs-exact energy distance is reported as within noise."""
    by_id = {r["id"]: r for r in rows}
    out = []
    for claim, better, worse in CLAIMS:
        if better not in by_id or worse not in by_id:
            continue
        a, b = by_id[better]["energy"], by_id[worse]["energy"]
        verdict = "within noise" if abs(a - b) < 3 * noise_sd else ("holds" if a < b else "does not hold")
        out.append({"claim": claim, "row": better, "energy": a, "compared_with": worse,
                    "compared_energy": b, "verdict": verdict})
    return out


# -- reporting ----------------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    head = f"{'row':<36}{'NFE':>4}{'energy':>10}{'SW2':>8}{'modes':>7}{'in-mode':>9}{'class':>7}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['label']:<36}{r['nfe']:>4}{r['energy']:>10.4f}{r['sliced_w2']:>8.4f}"
                     f"{r['modes_covered']:>4}/{r['modes']:<2}{100 * r['in_mode']:>8.1f}%{100 * r['class_acc']:>6.1f}%")
    noise = result["noise"]
    lines.append(f"energy of exact vs exact: {noise['energy_exact_mean']:.4f} ± {noise['energy_exact_sd']:.4f}")
    lines.append("")
    for c in result["claims"]:
        lines.append(f"[{c['verdict']}] {c['claim']}: {c['energy']:.4f} ({c['row']}) vs "
                     f"{c['compared_energy']:.4f} ({c['compared_with']})")
    secs = ", ".join(f"{k} {v:.0f}s" for k, v in result["seconds"].items())
    lines.append(f"time: {secs}")
    return "\n".join(lines)


GROUP_COLOURS = {"reference": "#777777", "teacher": "#4c72b0", "lcm": "#dd8452", "osv": "#55a868",
                 "osv-m1": "#8172b3", "osv-no-stage1": "#c44e52", "mcm": "#937860", "avdm2": "#da8bc3"}


def save_plot(result: dict, path: Path) -> Path | None:
    """Bar charts of energy distance and in-mode fraction per row; None (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    labels = [r["label"] for r in rows]
    colours = [GROUP_COLOURS.get(r["group"], "#999999") for r in rows]
    floor = max(3 * result["noise"]["energy_exact_sd"], 1e-6)
    fig, (ax_e, ax_m) = plt.subplots(1, 2, figsize=(13, 0.38 * len(rows) + 1.5), sharey=True)
    ax_e.barh(labels, [max(r["energy"], floor) for r in rows], color=colours)
    ax_e.axvline(floor, color="k", ls="--", lw=0.8, label="3 sd of exact vs exact")
    ax_e.set_xscale("log")
    ax_e.set_xlabel("energy distance to exact samples (lower is better)")
    ax_e.legend(loc="lower right", fontsize=8)
    ax_e.invert_yaxis()
    ax_m.barh(labels, [100 * r["in_mode"] for r in rows], color=colours)
    ax_m.set_xlabel("samples inside a mode, % (exact ≈ 99)")
    ax_m.set_xlim(0, 100)
    fig.suptitle(f"prodistill quality bench ({result['settings']['name']}, seed {result['seed']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_temp(path)
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def write_json(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return path


FIXED = ("method", "preset", "device", "dtype", "seed", "out", "frames", "batch_size", "stage1_steps", "stage2_steps",
         "solver_steps", "student_steps", "cm_scale", "cm_sigma_data", "guidance_min", "guidance_max")
"""Options the benchmark sets itself (or has its own flag for): not open to `--set` (w = 1 keeps the teacher exact:
the module's docstring)."""


def parse_overrides(items: tuple[str, ...]) -> tuple[tuple[str, object], ...]:
    """`("huber_c=0.01", "ema_decay=0.99")` → ((key, typed value), ...), values read as YAML and given their option's
    type as a config file's are; unknown or fixed keys and values of the wrong type are one sentence."""
    import yaml

    from prodistill.config import TrainConfig, _yaml_value

    known = set(TrainConfig.__dataclass_fields__)
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise ValueError(f"--set {item}: give KEY=VALUE with KEY a training option (see `prodistill train --help`, "
                             "dashes or underscores)")
        if key in FIXED:
            raise ValueError(f"--set {item}: the benchmark sets {key} itself" +
                             (f"; use --{key.replace('_', '-')}" if key.startswith("cm_") else ""))
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value  # `a: b`, `[1`: not YAML; the type check below names the option
        pairs.append((key, _yaml_value(f"--set {item}", key, parsed)))
    return tuple(pairs)


def settings_for(quick: bool) -> BenchSettings:
    return QUICK if quick else FULL


__all__ = ["BenchSettings", "QUICK", "FULL", "STUDENTS", "CLAIMS", "select_students", "Evaluator", "energy_distance",
           "sliced_wasserstein", "run_quality_bench", "judge_claims", "format_table", "save_plot", "write_json",
           "settings_for"]
