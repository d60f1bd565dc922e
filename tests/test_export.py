"""`prodistill export` on the tiny preset: LoRA merge, ONNX graphs vs PyTorch, manifest, errors, diffusers."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_lora_run
from export.onnx_export import ExportError
from prodistill.cli import main

GRAPHS = ("image_encoder", "vae_encoder", "denoiser", "decoder")


def _student(cfg, run):
    from prodistill.models.student import load_trainable
    from prodistill.training.checkpoint import load_weights
    from prodistill.training.run import build_models

    models = build_models(cfg, torch.device("cpu"))
    student = models.make_student(cfg, stage=1)
    load_trainable(student, load_weights(run / "stage1" / "ckpt-0000001")["student"])
    return models, student


def _denoiser_inputs(models, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 4, 4, 4, generator=g) * 3
    embeds, latents = torch.randn(1, 1, 32, generator=g), torch.randn(1, 4, 4, 4, 4, generator=g)
    return x, torch.tensor([3.0]), embeds, latents, torch.tensor([[6.0, 127.0, 0.02]])


def test_merge_equals_the_unmerged_student_and_leaves_the_teacher_untouched(tmp_path):
    from export.graphs import merge_student
    from prodistill.models.svd import SVDCondition, edm_denoise

    cfg, run = make_lora_run(tmp_path)
    models, student = _student(cfg, run)
    teacher_before = {k: v.clone() for k, v in models.unet.state_dict().items()}
    merged = merge_student(student)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    for k, v in models.unet.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    x, sigma, *cond = _denoiser_inputs(models)
    with torch.no_grad():
        d_student, d_merged, d_teacher = (edm_denoise(net, x, sigma, SVDCondition(*cond))
                                          for net in (student, merged, models.unet))
    assert (d_student - d_merged).abs().max() < 1e-5
    assert (d_student - d_teacher).abs().max() > 1e-2  # the LoRA matters, so the check above can fail


def test_every_graph_matches_pytorch_within_tolerance(exported):
    cfg, _, engines, log = exported
    manifest = json.loads((engines / "manifest.json").read_text())
    assert (manifest["cm_sigma_data"], manifest["cm_scale"]) == (cfg.cm_sigma_data, cfg.cm_scale)  # for the runtime
    for name in GRAPHS:
        parity = manifest["graphs"][name]["parity"]
        assert parity["tolerance"] == 1e-4 and parity["rel"] <= 1e-4 and parity["max_abs"] < 1e-3, (name, parity)
        assert any(line.startswith(f"  {name}: max abs error") for line in log)


def test_denoiser_graph_matches_the_students_edm_denoiser_at_the_tts_sigma(exported):
    """An independent check of the exported denoiser: the unmerged student through `edm_denoise` (what
    `prodistill sample` calls) vs ONNX Runtime, at the σ TTS travels to, on fresh inputs."""
    import onnxruntime as ort

    from prodistill.models.svd import SVDCondition, edm_denoise

    cfg, run, engines, _ = exported
    manifest = json.loads((engines / "manifest.json").read_text())
    models, student = _student(cfg, run)
    x, _, *cond = _denoiser_inputs(models, seed=1)
    sigma = torch.tensor([manifest["sigmas_tts"][1]], dtype=torch.float32)
    with torch.no_grad():
        ref = edm_denoise(student, x, sigma, SVDCondition(*cond)).numpy()
    session = ort.InferenceSession(str(engines / "denoiser.onnx"), providers=["CPUExecutionProvider"])
    names = ["x", "sigma", "image_embeds", "image_latents", "added_time_ids"]
    got = session.run(None, dict(zip(names, (t.numpy() for t in (x, sigma, *cond)))))[0]
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()


def test_manifest_content(exported):
    from prodistill.diffusion.edm import sampler_indices, training_grid

    cfg, run, engines, _ = exported
    m = json.loads((engines / "manifest.json").read_text())
    grid = training_grid(10).to(torch.float32)
    assert (m["width"], m["height"], m["frames"], m["fps"]) == (32, 32, 4, 7.0)
    assert (m["motion_bucket_id"], m["noise_aug_strength"], m["latent_shape"]) == (127, 0.02, [1, 4, 4, 4, 4])
    assert m["sigmas_1step"] == [700.0] == [float(grid[9])]
    assert m["sigmas_tts"] == [700.0, float(grid[sampler_indices(2, 10)[1]])] and m["sigmas_tts"][1] < 700
    assert (m["sigma_min"], m["num_timesteps"], m["precision"], m["opset"], m["format"]) == (0.002, 10, "fp32", 19, 1)
    assert (m["clip_size"], m["scaling_factor"]) == (32, 0.18215)
    assert m["graphs"]["denoiser"]["inputs"] == {"x": [1, 4, 4, 4, 4], "sigma": [1], "image_embeds": [1, 1, 32],
                                                 "image_latents": [1, 4, 4, 4, 4], "added_time_ids": [1, 3]}
    assert m["graphs"]["decoder"]["outputs"] == {"pixels": [1, 4, 3, 32, 32]}
    assert m["graphs"]["image_encoder"]["inputs"] == {"pixel_values": [1, 3, 32, 32]}
    assert m["graphs"]["vae_encoder"]["outputs"] == {"image_latent": [1, 4, 4, 4]}
    weights = run / "stage1" / "ckpt-0000001" / "student.safetensors"
    assert m["source"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (m["source"]["weights"], m["source"]["method"], m["source"]["lora_rank"]) == ("student", "osv", 2)
    assert sorted(p.name for p in engines.iterdir()) == sorted([f"{g}.onnx" for g in GRAPHS] + ["manifest.json"])


def test_fp16_graph_with_external_data_matches_pytorch(tmp_path):
    """fp16 inside the graph, float32 at its boundary; weights in one external file when forced."""
    import onnx

    from export.graphs import ImageEncoderGraph
    from export.onnx_export import export_all
    from prodistill.training.run import build_models

    cfg, _ = make_lora_run(tmp_path)
    models = build_models(cfg, torch.device("cpu"))
    graph = ImageEncoderGraph(torch.nn.Module.to(models.image_encoder, dtype=torch.float16), torch.float16).eval()
    infos = export_all({"image_encoder": graph}, {"image_encoder": {"pixel_values": (1, 3, 32, 32)}}, tmp_path, "fp16",
                       [6.0, 127.0, 0.02], 700.0, echo=lambda s: None, external_data_bytes=0)
    info = infos["image_encoder"]
    assert info.external_data == "image_encoder.onnx.data" and (tmp_path / info.external_data).stat().st_size > 10_000
    assert (tmp_path / "image_encoder.onnx").stat().st_size < 50_000
    model = onnx.load(str(tmp_path / "image_encoder.onnx"), load_external_data=False)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert 1e-6 < info.parity["rel"] <= 2e-2  # fp16 kernels differ a little, never by more than the tolerance


def test_low_precision_graphs_keep_group_norm_statistics_in_fp32(tmp_path):
    """Below fp32 every GroupNorm of every graph becomes an `Fp32GroupNorm` (weights in the graph's dtype, fp32
    statistics, output in the graph's dtype) equal to torch's float32 GroupNorm; fp32 graphs keep plain
    GroupNorms. Every fp16 graph runs in torch (the temporal decoder takes its working dtype from a norm's
    weight: float32 norm weights once made it fail)."""
    from export.graphs import Fp32GroupNorm, build_graphs, merge_student
    from export.onnx_export import example_inputs
    from export.run import graph_shapes
    from prodistill.training.run import build_models

    cfg, _ = make_lora_run(tmp_path)
    models = build_models(cfg, torch.device("cpu"))
    graphs = build_graphs(models, merge_student(models.unet), "fp16")
    norms = [m for g in graphs.values() for m in g.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) > 10 and all(type(m) is Fp32GroupNorm and m.weight.dtype == torch.float16 for m in norms)
    shapes = graph_shapes(models, cfg)
    generator = torch.Generator().manual_seed(0)
    for name, graph in graphs.items():
        inputs = example_inputs(name, graph, shapes[name], [6.0, 127.0, 0.02], 80.0, generator)
        with torch.no_grad():
            out = graph(*inputs.values())
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), name
    assert {type(m) for g in build_graphs(models, merge_student(models.unet), "fp32").values()
            for m in g.modules() if isinstance(m, torch.nn.GroupNorm)} == {torch.nn.GroupNorm}
    ref = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(ref.weight)
    x = torch.randn(2, 8, 5, 5) * 30
    got = Fp32GroupNorm.replacing(ref.half())(x.half())
    ref.weight.data, ref.bias.data = ref.weight.half().float(), ref.bias.half().float()
    assert got.dtype == torch.float16 and torch.allclose(got.float(), ref(x.half().float()), atol=2e-2, rtol=1e-2)


def test_an_export_over_tolerance_fails_loudly(exported, tmp_path):
    from export.graphs import DecoderGraph
    from export.onnx_export import ExportError, check_parity, example_inputs
    from export.runtime.manifest import Manifest
    from prodistill.training.run import build_models

    cfg, _, engines, _ = exported
    models = build_models(cfg, torch.device("cpu"))
    graph = DecoderGraph(models.vae, models.scaling_factor, torch.float32).eval()
    with torch.no_grad():
        models.vae.decoder.conv_out.bias += 0.5  # PyTorch now disagrees with the exported graph
    inputs = example_inputs("decoder", graph, {"latents": (1, 4, 4, 4, 4)}, [], 700.0, torch.Generator())
    with pytest.raises(ExportError, match="over the fp32 tolerance"):
        check_parity("decoder", graph, inputs, engines, Manifest.load(engines).graphs["decoder"], "fp32")


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "{tmp}/nothing"], "no such folder"),
    (["--resolution", "30x32"], "multiples of 16"),
    (["--decoder", "tiny"], "--decoder tiny needs --tiny-decoder DIR"),
    (["--decoder", "tiny", "--tiny-decoder", "{tmp}"], "holds no tiny_decoder.json"),
    (["--tiny-decoder", "{tmp}"], "add --decoder tiny"),
    (["--weights", "ema"], "no ema weights"),
    (["--opset", "21"], "'21' is not one of"),
    (["--out", "/proc/eng"], "--out /proc/eng cannot be written"),
    (["--out", "{tmp}"], "holds run, which an export does not write"),
    (["--diffusers", "/proc/svd"], "--diffusers /proc/svd cannot be written"),
    (["--onnx", "--diffusers", "{tmp}/eng/svd"], "must be separate folders"),
])
def test_bad_input_is_one_sentence_before_any_model_is_built(tmp_path, args, message, monkeypatch):
    _, run = make_lora_run(tmp_path)
    built = []
    monkeypatch.setattr("prodistill.training.run.build_models", lambda *a: built.append(a))
    ckpt = ["--ckpt", str(run)] if "--ckpt" not in args else []
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(main, ["export", *ckpt, "--out", str(tmp_path / "eng"), "--device", "cpu", *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and not built and not (tmp_path / "eng").exists()


def test_a_damaged_checkpoint_file_is_one_sentence_before_any_model_is_built(tmp_path, monkeypatch):
    from prodistill.training.checkpoint import latest_checkpoint

    _, run = make_lora_run(tmp_path)
    stage = next(s for s in (2, 1) if (run / f"stage{s}").is_dir())
    weights = latest_checkpoint(run / f"stage{stage}") / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:10])
    monkeypatch.setattr("prodistill.training.run.build_models", lambda *a: pytest.fail("models built"))
    result = CliRunner().invoke(main, ["export", "--ckpt", str(run), "--out", str(tmp_path / "eng"), "--device", "cpu"])
    assert result.exit_code != 0 and f"the checkpoint file {weights} is damaged" in result.output, result.output


@pytest.mark.parametrize("mounted", [False, True])
@pytest.mark.parametrize("failure", [ExportError("decoder: ... the export is not usable"), KeyboardInterrupt()])
def test_a_failed_reexport_leaves_the_old_engines_and_a_complete_one_replaces_them_whole(exported, tmp_path,
                                                                                          monkeypatch, failure,
                                                                                          mounted):
    """The engines are built beside --out (inside it when it is a mount point, as a Docker volume is) and swapped in
    once complete: an export that fails or is interrupted mid-way leaves the old folder byte for byte (and a fresh
    --out absent); one that completes leaves nothing of the old set (its stale TensorRT engine) but the timing
    cache. Partial folders, an earlier one killed outright included, never remain. The graphs are stand-ins: what
    is tested is where they are written."""
    import os
    import shutil

    from export.runtime.manifest import GraphInfo

    _, run, _, _ = exported
    engines, fresh = tmp_path / "engines", tmp_path / "fresh"
    shutil.copytree(exported[2], engines)
    (engines / "denoiser.plan").write_bytes(b"stale engine")
    (engines / "timing.cache").write_bytes(b"timings")
    before = {p.name: p.read_bytes() for p in engines.iterdir()}
    if mounted:
        monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == engines.resolve())
    ((engines if mounted else tmp_path) / ".engines.partial-killed").mkdir()

    def failing(graphs, shapes, folder, *args, **kwargs):
        (folder / "image_encoder.onnx").write_bytes(b"new graph")
        raise failure

    def stand_in(graphs, shapes, folder, *args, **kwargs):
        for name in graphs:
            (folder / f"{name}.onnx").write_bytes(b"new graph")
        return {name: GraphInfo(file=f"{name}.onnx", inputs={}, outputs={}) for name in graphs}

    def export(out):
        return CliRunner().invoke(main, ["export", "--ckpt", str(run), "--out", str(out), "--device", "cpu"])

    monkeypatch.setattr("export.run.export_all", failing)
    for out in (engines, fresh):
        result = export(out)
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert {p.name: p.read_bytes() for p in engines.iterdir()} == before and not fresh.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["engines"]
    monkeypatch.setattr("export.run.export_all", stand_in)
    result = export(engines)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in engines.iterdir()) == sorted([f"{g}.onnx" for g in GRAPHS] + ["manifest.json",
                                                                                                 "timing.cache"])
    assert (engines / "denoiser.onnx").read_bytes() == b"new graph"
    assert (engines / "timing.cache").read_bytes() == b"timings" and [p.name for p in tmp_path.iterdir()] == ["engines"]


@pytest.mark.parametrize("missing, flag, message", [
    ("onnxruntime", [], 'pip install ".[export]"'),
    ("tensorrt", ["--trt"], "Docker image"),
])
def test_missing_packages_are_one_sentence_with_the_install_hint(tmp_path, monkeypatch, missing, flag, message):
    _, run = make_lora_run(tmp_path)
    monkeypatch.setitem(sys.modules, missing, None)  # import → ImportError
    result = CliRunner().invoke(main, ["export", "--ckpt", str(run), "--out", str(tmp_path / "eng"), *flag])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "eng").exists()


def test_diffusers_folder_loads_with_the_merged_unet(tmp_path):
    from diffusers import StableVideoDiffusionPipeline

    from export.graphs import merge_student

    cfg, run = make_lora_run(tmp_path)
    out = tmp_path / "diffusers"
    result = CliRunner().invoke(main, ["export", "--ckpt", str(run), "--diffusers", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "eng").exists()  # --diffusers alone writes no ONNX
    pipe = StableVideoDiffusionPipeline.from_pretrained(str(out))
    _, student = _student(cfg, run)
    merged = merge_student(student).state_dict()
    loaded = pipe.unet.state_dict()
    assert set(loaded) == set(merged) and all(torch.equal(loaded[k], merged[k]) for k in merged)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.sigma_max == 700.0
    assert pipe.feature_extractor.crop_size == {"height": 32, "width": 32}


def test_diffusers_pipeline_runs_one_step(tmp_path):
    """SVD's pipeline resizes the CLIP input to a hard-coded 224², so this builds tiny models with a 224-pixel
    CLIP (patch 32) and runs a 1-step call of the folder `write_diffusers_folder` writes."""
    from diffusers import AutoencoderKLTemporalDecoder, StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from export.diffusers_folder import write_diffusers_folder
    from prodistill.models.presets import TINY
    from prodistill.models.svd import SVDModels

    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY.image_encoder, "image_size": 224, "patch_size": 32}))
    models = SVDModels(UNetSpatioTemporalConditionModel(**TINY.unet), AutoencoderKLTemporalDecoder(**TINY.vae), clip)
    write_diffusers_folder(models, models.unet, tmp_path / "svd")
    pipe = StableVideoDiffusionPipeline.from_pretrained(str(tmp_path / "svd"))
    frames = pipe(Image.new("RGB", (32, 32), (200, 80, 40)), height=32, width=32, num_frames=4, num_inference_steps=1,
                  min_guidance_scale=1.0, max_guidance_scale=1.0, decode_chunk_size=4, output_type="np",
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 4, 32, 32, 3) and np.isfinite(frames).all() and frames.std() > 0


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_traceable_repeat_interleave_equals_torchs_and_is_restored(dim):
    """The tracing stand-in (unsqueeze → expand → flatten) gives torch's result for an int and a 0-dim count, and
    leaves other calls and torch itself untouched."""
    from export.onnx_export import traceable_repeat_interleave

    x = torch.randn(2, 3, 4)
    want = x.repeat_interleave(3, dim=dim)
    original = torch.Tensor.repeat_interleave
    with traceable_repeat_interleave():
        assert torch.Tensor.repeat_interleave is not original
        assert torch.equal(x.repeat_interleave(3, dim=dim), want)
        assert torch.equal(x.repeat_interleave(torch.tensor(3), dim=dim), want)
        assert torch.equal(x.repeat_interleave(torch.tensor([1, 2]), dim=0), original(x, torch.tensor([1, 2]), dim=0))
    assert torch.Tensor.repeat_interleave is original


def test_chunked_attention_equals_sdpa_and_exports_one_softmax_per_chunk(tmp_path):
    """Above the score limit the attention is exported as ceil(queries / rows) chunks with the same result
    (rows = limit // (batch·heads·keys)); below it, and after the context, torch's SDPA is untouched. The ONNX
    graph carries one Softmax per chunk and ONNX Runtime reproduces torch."""
    from export.onnx_export import chunked_attention, import_onnx

    onnx, ort = import_onnx()
    q, k, v = (torch.randn(2, 3, 50, 8) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    want = sdpa(q, k, v)
    limit = 2 * 3 * 50 * 12  # 12 query rows per chunk: 5 chunks of 50 queries
    with chunked_attention(limit):
        assert torch.allclose(torch.nn.functional.scaled_dot_product_attention(q, k, v), want, atol=1e-6)
    assert torch.nn.functional.scaled_dot_product_attention is sdpa

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    for limit, softmaxes in ((limit, 5), (2 * 3 * 50 * 50, 1)):
        path = tmp_path / f"attend-{limit}.onnx"
        with chunked_attention(limit):
            torch.onnx.export(Attend(), (q, k, v), str(path), dynamo=False, opset_version=19,
                              input_names=["q", "k", "v"])
        assert [n.op_type for n in onnx.load(str(path)).graph.node].count("Softmax") == softmaxes
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]
        assert np.abs(got - want.numpy()).max() < 1e-5


def test_exported_denoiser_carries_the_exact_rewrite(exported):
    """The denoiser computes fewer attentions than it has attention modules: one-key cross-attention is its
    projected value (that the function is unchanged, the parity tests above check against the unrewritten
    student)."""
    import onnx

    _, _, engines, _ = exported
    denoiser = onnx.load(str(engines / "denoiser.onnx"))
    softmaxes = sum(n.op_type == "Softmax" for n in denoiser.graph.node)
    assert softmaxes == 8  # tiny preset: 4 attention models × (spatial + temporal) self-attention; 8 cross ones gone
