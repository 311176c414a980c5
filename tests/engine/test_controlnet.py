"""ControlNet units through the real img2img pipeline on the tiny checkpoints, with tiny ControlNets in the real
formats (``demo.controlnet``): lllyasviel single files (+ sidecar config) and diffusers folders."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from tests.support.logs import assert_load_lines
from tests.support.pipeline_run import generate

from underpaint.demo import controlnet as demo
from underpaint.engine.adapters import controlnet as cn
from underpaint.engine.conditioning import TextEncoderBundle
from underpaint.engine.job import ControlNetUnitSpec, JobError
from underpaint.engine.loader import LoadedCheckpoint, load_checkpoint
from underpaint.engine.pipeline import Components, PipelineInputs, VaePrecision
from underpaint.engine.samplers import DiscreteSchedule
from underpaint.registry import ModelEntry, ModelRegistry
from underpaint.vocabulary import SamplerName

CPU = torch.device("cpu")
SIZE = 64
CANNY = "control_v11p_sd15_canny"
CANNY_DIFFUSERS = demo.SD15_CANNY_DIFFUSERS
OPENPOSE = "control_v11p_sd15_openpose"
MIDAS = "dpt_hybrid-midas-501f0c75.pt"


@pytest.fixture(scope="module")
def models(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoints (linked, read-only) plus the demo ControlNets and annotators."""
    dest = tmp_path_factory.mktemp("cn") / "models"
    dest.mkdir()
    (dest / "checkpoint").symlink_to(tiny_models_dir / "checkpoint", target_is_directory=True)
    demo.write_demo_controlnets(dest)
    return dest


@pytest.fixture(scope="module")
def registry(models: Path) -> ModelRegistry:
    return ModelRegistry(models)


@pytest.fixture(scope="module")
def sd15(registry: ModelRegistry) -> LoadedCheckpoint:
    entry = registry.resolve("checkpoint", "tiny-sd15.safetensors")
    assert entry is not None
    return load_checkpoint(entry, CPU, torch.float32)


@pytest.fixture(scope="module")
def sdxl(registry: ModelRegistry) -> LoadedCheckpoint:
    entry = registry.resolve("checkpoint", "tiny-sdxl.safetensors")
    assert entry is not None
    return load_checkpoint(entry, CPU, torch.float32)


@pytest.fixture
def fresh_cache() -> cn.ControlNetCache:
    """The loaded ControlNets a test's hooks share (the executor owns one; nothing is module-level)."""
    return cn.ControlNetCache()


def init_image() -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def control_image(size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    h, w = arr.shape[:2]
    arr[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255  # a white square: strong structure, clean edges
    return Image.fromarray(arr)


def unit(model: str, **kw: Any) -> ControlNetUnitSpec:
    kw.setdefault("image", control_image())
    return ControlNetUnitSpec(model=model, **kw)


def components(loaded: LoadedCheckpoint) -> Components:
    return Components(
        unet=loaded.unet,
        vae=loaded.vae,
        bundle=TextEncoderBundle(list(loaded.tokenizers), cast(list[Any], loaded.text_encoders), loaded.is_sdxl),
        schedule=DiscreteSchedule.from_betas(*loaded.betas),
        prediction_type=loaded.prediction_type,
        vae_scaling_factor=loaded.vae_scaling_factor,
        is_sdxl=loaded.is_sdxl,
        device=CPU,
        dtype=torch.float32,
        vae_precision=VaePrecision(),
    )


def hook(
    registry: ModelRegistry,
    loaded: LoadedCheckpoint,
    units: list[ControlNetUnitSpec],
    controlnets: cn.ControlNetCache | None = None,
) -> Any:
    entries: list[tuple[ModelEntry, ControlNetUnitSpec]] = []
    for u in units:
        entry = registry.resolve("controlnet", u.model)
        assert entry is not None, u.model
        entries.append((entry, u))
    annotators = registry.models_dir / "annotator"
    return cn.build_control_hook(loaded, entries, SIZE, SIZE, annotators, CPU, seed=3, controlnets=controlnets)


def run(registry: ModelRegistry, loaded: LoadedCheckpoint, units: list[ControlNetUnitSpec]) -> np.ndarray:
    inputs = PipelineInputs(
        init_image=init_image(),
        prompt="a cat",
        negative_prompt="",
        width=SIZE,
        height=SIZE,
        seeds=[11],
        steps=4,
        guidance_scale=7.0,
        sampler_name=SamplerName("Euler"),
        strength=0.75,
        control=hook(registry, loaded, units) if units else None,
    )
    return np.asarray(generate(components(loaded), inputs)[0]).astype(np.int16)


def run_executor(executor: Any, checkpoint: str, units: tuple[ControlNetUnitSpec, ...]) -> np.ndarray:
    """One 4-step img2img of the test picture through the executor (the worker's path), as int16 pixels."""
    from underpaint.engine.job import GenerationJob

    spec = GenerationJob(
        checkpoint=checkpoint,
        init_image=init_image(),
        prompt="a cat",
        negative_prompt="",
        width=SIZE,
        height=SIZE,
        image_num=1,
        steps=4,
        guidance_scale=7.0,
        sampler_name=SamplerName("Euler"),
        seed=11,
        strength=0.75,
        controlnets=units,
    )
    return np.asarray(executor.generate(spec)[0].image).astype(np.int16)


def differ(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


# -- formats and names ------------------------------------------------------------------------------------------


def test_seed_names_resolve_and_base_model_is_detected(registry: ModelRegistry) -> None:
    expected = {CANNY: False, OPENPOSE: False, CANNY_DIFFUSERS: False}
    expected.update({"controlnet-canny-sdxl-1.0": True, "controlnet-depth-sdxl-1.0": True})
    for name, is_sdxl in expected.items():
        entry = registry.resolve("controlnet", name)
        assert entry is not None, name
        assert entry.is_sdxl == is_sdxl, name


def test_written_files_are_in_the_original_layouts(models: Path) -> None:
    keys = set(safetensors.torch.load_file(str(models / "controlnet" / demo.SDXL_DEPTH)))
    for key in (
        "control_model.input_blocks.0.0.weight",
        "control_model.zero_convs.0.0.weight",
        "control_model.input_hint_block.14.weight",
        "control_model.middle_block_out.0.weight",
        "control_model.time_embed.0.weight",
        "control_model.label_emb.0.0.weight",
        "control_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight",
    ):
        assert key in keys, key
    assert all(k.startswith("control_model.") for k in keys)
    assert (models / "controlnet" / "controlnet-canny-sdxl-1.0" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("name", "is_sdxl", "seed"),
    [
        (CANNY, False, demo.SD15_CANNY_SEED),
        (CANNY_DIFFUSERS, False, demo.SD15_CANNY_SEED),
        ("controlnet-canny-sdxl-1.0", True, demo.SDXL_CANNY_SEED),
        ("controlnet-depth-sdxl-1.0", True, demo.SDXL_DEPTH_SEED),  # single file: label_emb must survive
    ],
)
def test_loaded_weights_equal_the_written_ones(registry: ModelRegistry, name: str, is_sdxl: bool, seed: int) -> None:
    entry = registry.resolve("controlnet", name)
    assert entry is not None
    loaded = cn.load_controlnet_model(entry, CPU, torch.float32).state_dict()
    reference = demo.tiny_controlnet(is_sdxl, seed).state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    # the zero-convs really are perturbed (a zero ControlNet would make every test below trivial)
    assert reference["controlnet_mid_block.weight"].abs().sum() > 0


def test_other_published_layouts_load(models: Path, tmp_path: Path) -> None:
    """A diffusers-keyed single file (a downloaded ``diffusion_pytorch_model.safetensors``, renamed) with a sidecar,
    and a diffusers folder holding only the fp16 variant."""
    src = models / "controlnet" / "controlnet-canny-sdxl-1.0"
    folder = tmp_path / "controlnet"
    (folder / "xl-diffusers-keys.config").mkdir(parents=True)
    shutil.copy(src / "diffusion_pytorch_model.safetensors", folder / "xl-diffusers-keys.safetensors")
    shutil.copy(src / "config.json", folder / "xl-diffusers-keys.config" / "config.json")
    (folder / "xl-fp16").mkdir()
    shutil.copy(src / "config.json", folder / "xl-fp16" / "config.json")
    shutil.copy(
        src / "diffusion_pytorch_model.safetensors", folder / "xl-fp16" / "diffusion_pytorch_model.fp16.safetensors"
    )
    reg = ModelRegistry(tmp_path)
    reference = demo.tiny_controlnet(True, demo.SDXL_CANNY_SEED).state_dict()
    for name in ("xl-diffusers-keys", "xl-fp16"):
        entry = reg.resolve("controlnet", name)
        assert entry is not None, name
        assert entry.is_sdxl, name
        loaded = cn.load_controlnet_model(entry, CPU, torch.float32).state_dict()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference), name


def test_file_without_fitting_config_is_a_clear_error(models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "controlnet"
    folder.mkdir()
    shutil.copy(models / "controlnet" / demo.SD15_CANNY, folder / demo.SD15_CANNY)  # no sidecar: real SD1.5 config
    (folder / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    reg = ModelRegistry(tmp_path)
    tiny = reg.resolve("controlnet", CANNY)
    junk = reg.resolve("controlnet", "junk")
    assert tiny is not None
    assert junk is not None
    with pytest.raises(JobError, match=r"does not fit .*controlnet_sd15.*sidecar control_v11p_sd15_canny\.config"):
        cn.load_controlnet_model(tiny, CPU, torch.float32)
    with pytest.raises(JobError, match="junk"):
        cn.load_controlnet_model(junk, CPU, torch.float32)


def test_cache_loads_each_model_once(
    registry: ModelRegistry, sd15: LoadedCheckpoint, fresh_cache: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="underpaint.engine"):
        hook(registry, sd15, [unit(CANNY)], fresh_cache)
        hook(registry, sd15, [unit(CANNY), unit(CANNY, strength=0.5)], fresh_cache)
    assert fresh_cache.loads == 1
    entry = registry.resolve("controlnet", CANNY)
    assert entry is not None
    assert_load_lines(caplog, "ControlNet", [entry.sd_name])  # one INFO line for the one load: file, seconds


# -- generation -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(registry: ModelRegistry, sd15: LoadedCheckpoint) -> np.ndarray:
    return run(registry, sd15, [])


@pytest.fixture(scope="module")
def canny_full(registry: ModelRegistry, sd15: LoadedCheckpoint) -> np.ndarray:
    return run(registry, sd15, [unit(CANNY)])


def test_one_unit_changes_the_output(canny_full: np.ndarray, plain: np.ndarray) -> None:
    assert differ(canny_full, plain) > 2.0


def test_strength_zero_equals_plain_img2img(registry: ModelRegistry, sd15: LoadedCheckpoint, plain: np.ndarray) -> None:
    assert np.array_equal(run(registry, sd15, [unit(CANNY, strength=0.0)]), plain)


def test_strength_is_the_conditioning_scale(registry: ModelRegistry, sd15: LoadedCheckpoint) -> None:
    """Residuals scale linearly with the unit's strength (A1111 weight = diffusers conditioning_scale)."""
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0])
    ehs = torch.randn(2, 77, 32)
    full = hook(registry, sd15, [unit(CANNY)])(x, t, ehs, None, 0.0)
    half = hook(registry, sd15, [unit(CANNY, strength=0.5)])(x, t, ehs, None, 0.0)
    assert torch.allclose(half["mid_block_additional_residual"], full["mid_block_additional_residual"] * 0.5, atol=1e-6)
    for a, b in zip(half["down_block_additional_residuals"], full["down_block_additional_residuals"], strict=True):
        assert torch.allclose(a, b * 0.5, atol=1e-6)


def test_guidance_window(
    registry: ModelRegistry, sd15: LoadedCheckpoint, canny_full: np.ndarray, plain: np.ndarray
) -> None:
    late = run(registry, sd15, [unit(CANNY, guidance_start=0.5)])
    early = run(registry, sd15, [unit(CANNY, guidance_end=0.5)])
    # late steps only refine details: a small but real change
    assert differ(late, canny_full) > 2.0
    assert differ(late, plain) > 0.1
    assert differ(early, late) > 2.0
    # outside its window a unit adds nothing to the UNet call
    h = hook(registry, sd15, [unit(CANNY, guidance_start=0.5, guidance_end=0.75)])
    x, t, ehs = torch.zeros(2, 4, 8, 8), torch.tensor([500.0, 500.0]), torch.zeros(2, 77, 32)
    assert h(x, t, ehs, None, 0.25) == {}
    assert h(x, t, ehs, None, 0.8) == {}
    assert "mid_block_additional_residual" in h(x, t, ehs, None, 0.5)


def test_two_units(registry: ModelRegistry, sd15: LoadedCheckpoint, canny_full: np.ndarray, plain: np.ndarray) -> None:
    other = run(registry, sd15, [unit(OPENPOSE)])
    both = run(registry, sd15, [unit(CANNY), unit(OPENPOSE)])
    assert differ(both, canny_full) > 0.5
    assert differ(both, other) > 0.5
    assert differ(other, plain) > 2.0
    # a unit at strength 0 next to another equals that unit alone
    assert np.array_equal(run(registry, sd15, [unit(CANNY), unit(OPENPOSE, strength=0.0)]), canny_full)


def test_single_file_and_diffusers_folder_give_the_same_output(
    registry: ModelRegistry, sd15: LoadedCheckpoint, canny_full: np.ndarray
) -> None:
    assert np.array_equal(run(registry, sd15, [unit(CANNY_DIFFUSERS)]), canny_full)


def test_sdxl_controlnets_on_the_sdxl_checkpoint(registry: ModelRegistry, sdxl: LoadedCheckpoint) -> None:
    base = run(registry, sdxl, [])
    folder = run(registry, sdxl, [unit("controlnet-canny-sdxl-1.0")])
    single = run(registry, sdxl, [unit("controlnet-depth-sdxl-1.0", strength=0.8)])
    assert differ(folder, base) > 1.0
    assert differ(single, base) > 1.0
    assert differ(single, folder) > 0.5


def test_wrong_base_model_is_refused(
    registry: ModelRegistry, sd15: LoadedCheckpoint, sdxl: LoadedCheckpoint, fresh_cache: Any
) -> None:
    with pytest.raises(JobError, match=r"'controlnet-canny-sdxl-1.0' is for SDXL 1.0, the checkpoint is SD 1.5"):
        hook(registry, sd15, [unit(CANNY), unit("controlnet-canny-sdxl-1.0")], fresh_cache)
    with pytest.raises(JobError, match=r"is for SD 1.5, the checkpoint is SDXL"):
        hook(registry, sdxl, [unit(CANNY)], fresh_cache)
    assert fresh_cache.loads == 0  # refused before loading anything


# -- control maps -----------------------------------------------------------------------------------------------


def test_control_image_is_resized_to_the_output_size(registry: ModelRegistry, sd15: LoadedCheckpoint) -> None:
    h = hook(registry, sd15, [unit(CANNY, image=control_image((40, 24)))])
    assert h.units[0].image.shape == (1, 3, SIZE, SIZE)
    # no preprocessor: the (resized) image itself is the map, in [0, 1]
    expected = np.asarray(control_image((40, 24)).resize((SIZE, SIZE), Image.Resampling.LANCZOS), np.float32) / 255
    assert torch.allclose(h.units[0].image[0].permute(1, 2, 0), torch.from_numpy(expected))


def test_canny_preprocessor_map(registry: ModelRegistry, sd15: LoadedCheckpoint) -> None:
    picture = init_image()
    h = hook(registry, sd15, [unit(CANNY, image=picture, preprocessor="canny")])
    control = (h.units[0].image[0, 0] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(control, cv2.Canny(np.asarray(picture), 100, 200))


def test_annotator_with_local_weights_runs_in_a_unit(
    registry: ModelRegistry, sd15: LoadedCheckpoint, plain: np.ndarray
) -> None:
    out = run(registry, sd15, [unit(CANNY, image=init_image(), preprocessor="softedge_pidinet")])
    assert out.shape == (SIZE, SIZE, 3)
    assert differ(out, plain) > 1.0


def test_missing_annotator_is_a_clear_error(
    registry: ModelRegistry, sd15: LoadedCheckpoint, fresh_cache: Any, tmp_path: Path
) -> None:
    units = [unit(CANNY), unit(OPENPOSE, preprocessor="lineart")]
    entries = [(e, u) for u in units if (e := registry.resolve("controlnet", u.model)) is not None]
    with pytest.raises(JobError) as err:  # an annotator folder without the lineart files
        cn.build_control_hook(sd15, entries, SIZE, SIZE, tmp_path, CPU, seed=3, controlnets=fresh_cache)
    message = str(err.value)
    assert "sk_model.pth" in message
    assert "sk_model2.pth" in message
    assert str(tmp_path) in message
    assert fresh_cache.loads == 0


@pytest.mark.parametrize("config_name", ["controlnet_sd15", "controlnet_sdxl"])
def test_real_shapes_map_completely(config_name: str) -> None:
    """On the shipped real-size configs (meta tensors, no memory): every weight of the model has exactly one
    lllyasviel-layout key and comes back from it with its shape."""
    from accelerate import init_empty_weights
    from diffusers.models.controlnets.controlnet import ControlNetModel

    config = dict(ControlNetModel.load_config(str(cn.CONFIG_ROOT / config_name)))
    with init_empty_weights():
        model = ControlNetModel.from_config(config)
    state = model.state_dict()
    ldm = demo.controlnet_to_ldm(state, config)
    assert len(ldm) == len(state)
    back = cn._ldm_to_diffusers(ldm, config)
    assert back.keys() == state.keys()
    assert all(back[k].shape == state[k].shape for k in state)
    assert ("control_model.label_emb.0.0.weight" in ldm) == (config_name == "controlnet_sdxl")


# -- through the executor (the worker's path) --------------------------------------------------------------------


def test_executor_runs_units_and_refuses_the_wrong_base(models: Path) -> None:
    from underpaint.config import Settings
    from underpaint.engine.executor import DiffusersExecutor

    executor = DiffusersExecutor(Settings(models_dir=models, device="cpu", torch_threads=1), ModelRegistry(models))

    def job(*units: ControlNetUnitSpec) -> np.ndarray:
        return run_executor(executor, "tiny-sd15.safetensors", units)

    plain = job()
    controlled = job(unit(CANNY, image=control_image((48, 40)), preprocessor="canny"), unit(OPENPOSE, strength=0.5))
    assert differ(controlled, plain) > 2.0
    assert np.array_equal(job(unit(CANNY, strength=0.0)), plain)
    with pytest.raises(JobError, match=r"is for SDXL 1.0"):
        job(unit("controlnet-canny-sdxl-1.0"))
    # a network annotator from the demo files (the missing-file refusal: test_executor_runs_a_depth_unit)
    assert differ(job(unit(CANNY, preprocessor="lineart_coarse")), plain) > 1.0


def test_executor_runs_a_depth_unit(models: Path, sdxl: LoadedCheckpoint, tmp_path: Path) -> None:
    """A unit with preprocessor ``depth`` (MiDaS) through the worker's path: refused naming the file while it is
    missing, then the map made from the published-layout file conditions the SDXL depth ControlNet."""
    from underpaint.config import Settings
    from underpaint.demo.annotators import write_torch_annotator
    from underpaint.engine import preprocessors
    from underpaint.engine.executor import DiffusersExecutor

    mine = tmp_path / "models"  # the module's models plus an annotator folder of this test's own
    (mine / "annotator").mkdir(parents=True)
    for part in ("checkpoint", "controlnet"):
        (mine / part).symlink_to(models / part, target_is_directory=True)
    executor = DiffusersExecutor(Settings(models_dir=mine, device="cpu", torch_threads=1), ModelRegistry(mine))

    def job(*units: ControlNetUnitSpec) -> np.ndarray:
        return run_executor(executor, "tiny-sdxl.safetensors", units)

    depth_unit = unit("controlnet-depth-sdxl-1.0", image=init_image(), preprocessor="depth")
    with pytest.raises(JobError, match=re.escape(f"{MIDAS}: put them in {mine / 'annotator'}")):
        job(depth_unit)
    write_torch_annotator(MIDAS, mine / "annotator", seed=1)
    assert differ(job(depth_unit), job()) > 1.0  # the unit acts
    # and its control map is the depth map (the tiny ControlNet barely tells maps apart: checked on the hook)
    registry = ModelRegistry(mine)
    entry = registry.resolve("controlnet", depth_unit.model)
    assert entry is not None
    nets = executor.annotators  # the executor's loaded annotators: MiDaS was loaded once, for the first job
    assert (nets.loads, nets.kinds()) == (1, {"midas"})
    annotators = mine / "annotator"
    control = cn.build_control_hook(sdxl, [(entry, depth_unit)], SIZE, SIZE, annotators, CPU, 3, annotator_nets=nets)
    assert control is not None
    ctx = preprocessors.Context(annotators, 3, CPU, nets=nets)
    expected = np.asarray(preprocessors.run_preprocessor("depth", init_image(), ctx), np.float32) / 255
    assert torch.equal(control.units[0].image[0].permute(1, 2, 0), torch.from_numpy(expected))
    assert nets.loads == 1
