"""`manifest.json`: everything the runtime needs to know about an export, besides the graphs themselves.

The exporter writes it (from the training config and the checkpoint) and the runtime reads it; both sides
use this one class, so a field cannot be written under one name and read under another. Graph inputs and
outputs are float32 at the boundary whatever `precision` is: the casts to the compute precision live inside
the graphs (TensorRT 10/11 strongly typed networks take their precision from the graph, not from flags).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT_VERSION = 1

GRAPH_NAMES = ("image_encoder", "vae_encoder", "denoiser", "decoder")
"""image_encoder: CLIP pixels → embedding; vae_encoder: augmented first frame → latent mode;
denoiser: the EDM-preconditioned student D(x, σ); decoder: scaled latents → pixels."""


@dataclass
class GraphInfo:
    file: str
    """ONNX file name inside the engines folder."""
    inputs: dict[str, list[int]]
    """Input name → static shape (all float32)."""
    outputs: dict[str, list[int]]
    """Output name → static shape (all float32)."""
    external_data: str | None = None
    """Weights file beside `file` when the graph is too large for one protobuf (> 2 GB limit)."""
    engine: str | None = None
    """TensorRT engine file, when `--trt` built one."""
    parity: dict[str, float] = field(default_factory=dict)
    """ONNX Runtime vs PyTorch on the same random inputs: max_abs, rel (max_abs / max |PyTorch|), tolerance."""


@dataclass
class Manifest:
    width: int
    height: int
    frames: int
    fps: float
    motion_bucket_id: int
    noise_aug_strength: float
    latent_shape: list[int]
    """(1, F, 4, h, w) of the student's latents."""
    scaling_factor: float
    clip_size: int
    clip_mean: list[float]
    clip_std: list[float]
    sigma_min: float
    sigmas_1step: list[float]
    """The 1-step consistency sampler's σ (the top of the training grid), as `prodistill sample --steps 1`."""
    sigmas_tts: list[float]
    """TTS at one step (OSV eq. 13): (σ of the 1-step schedule, σ of the 2-step schedule's second step)."""
    num_timesteps: int
    precision: str
    opset: int
    graphs: dict[str, GraphInfo]
    source: dict
    """Where the weights came from: checkpoint folder, weights group, sha256 of each weights file, config."""
    sampler: str = "consistency"
    """consistency: a consistency student (1 step, or TTS); generator: a k-step generator whose denoiser output is
    its clean estimate (AVDM2), sampled over `sigmas_generator` with fresh noise between steps."""
    sigmas_generator: list[float] = field(default_factory=list)
    """The generator's k-step σ schedule (descending; the student's --student-steps), empty for consistency."""
    cm_sigma_data: float = 1.0
    cm_scale: float = 1.0
    """σ_data and timestep scaling of the consistency coefficients the student was trained with (--cm-*)."""
    format: int = FORMAT_VERSION

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {MANIFEST}: pass the --out folder of `prodistill export`")
        again = "export the folder again with `prodistill export`"
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}): {again}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a JSON object: {again}")
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path} has format {data.get('format')}, this runtime reads {FORMAT_VERSION}: "
                             "export again with this version")
        problem = _manifest_problem(data)
        if problem:
            raise ValueError(f"{path} is not a manifest this runtime can read ({problem}): {again}")
        data["graphs"] = {k: GraphInfo(**v) for k, v in data["graphs"].items()}
        return cls(**data)


def _manifest_problem(data: dict) -> str | None:
    """What a manifest's JSON object lacks or has in excess, or None: a damaged or hand-edited manifest is refused
    by name, not as a TypeError of the constructor."""
    problem = _fields_problem(Manifest, data)
    if problem:
        return problem
    graphs = data["graphs"]
    if not isinstance(graphs, dict) or any(g not in graphs for g in GRAPH_NAMES):
        return f"graphs must hold {', '.join(GRAPH_NAMES)}"
    return next(filter(None, (_fields_problem(GraphInfo, v, f"graph {k}: ") for k, v in graphs.items())), None)


def _fields_problem(cls, data, where: str = "") -> str | None:
    if not isinstance(data, dict):
        return f"{where}not a JSON object"
    known = {f.name: f for f in fields(cls)}
    missing = [n for n, f in known.items() if n not in data and f.default is MISSING and f.default_factory is MISSING]
    unknown = sorted(set(data) - set(known))
    if missing or unknown:
        return where + "; ".join(f"{label} {', '.join(names)}" for label, names in
                                 (("no", missing), ("unknown field(s)", unknown)) if names)
    return None
