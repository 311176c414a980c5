"""Model switching: release before load, in-place copies into resident modules, the RAM tier and prefetch.

The reference for every switched model is a fresh load of the same file through diffusers' own loaders
(``load_checkpoint``: the single-file converters, or ``from_pretrained`` for a diffusers folder): a switch must give
bit-identical weights and images.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from tests.support.logs import assert_load_lines

from underpaint.config import Settings
from underpaint.engine.executor import DiffusersExecutor
from underpaint.engine.job import GenerationJob
from underpaint.engine.loader import LoadedCheckpoint, ModelCache, architecture_of, load_checkpoint
from underpaint.registry import ModelEntry, ModelRegistry
from underpaint.vocabulary import SamplerName

CPU = torch.device("cpu")
SD15 = "tiny-sd15.safetensors"
OTHER = "other-sd15.safetensors"
HALF = "half-sd15.safetensors"
FOLDER = "tiny-sd15-diffusers"  # the demo folder: tiny-sd15's weights as a diffusers folder
OTHER_FOLDER = "other-sd15-diffusers"  # the same architecture, other weights (its UNet stored in float16)


@pytest.fixture(scope="module")
def models(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models plus two more SD 1.5 checkpoints of the tiny architecture with other weights: one float32,
    one float16 (each with the tiny sidecar config)."""
    dest = tmp_path_factory.mktemp("switching") / "models"
    shutil.copytree(tiny_models_dir, dest)
    ckpt = dest / "checkpoint"
    sd = safetensors.torch.load_file(str(ckpt / SD15))
    gen = torch.Generator().manual_seed(5)
    other = {
        k: v * 0.9 + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in sd.items()
    }
    safetensors.torch.save_file(other, str(ckpt / OTHER))
    half = {k: (v * 1.1).half() if v.is_floating_point() else v for k, v in sd.items()}
    safetensors.torch.save_file(half, str(ckpt / HALF))
    for name in (OTHER, HALF):
        shutil.copytree(ckpt / "tiny-sd15.config", ckpt / name.replace(".safetensors", ".config"))
    folder = ckpt / OTHER_FOLDER
    shutil.copytree(ckpt / FOLDER, folder)
    for file in folder.glob("*/*.safetensors"):
        tensors = safetensors.torch.load_file(str(file))
        changed = {k: v * 1.05 + 0.01 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}
        if file.parent.name == "unet":
            changed = {k: v.half() for k, v in changed.items()}
        safetensors.torch.save_file(changed, str(file), metadata={"format": "pt"})
    return dest


def entry(models: Path, name: str) -> ModelEntry:
    found = ModelRegistry(models).resolve("checkpoint", name)
    assert found is not None
    return found


def modules_of(loaded: LoadedCheckpoint) -> dict[str, torch.nn.Module]:
    return {"unet": loaded.unet, "vae": loaded.vae, **{f"te{i}": m for i, m in enumerate(loaded.text_encoders)}}


def assert_same_weights(got: LoadedCheckpoint, want: LoadedCheckpoint) -> None:
    for name, module in modules_of(want).items():
        mine = modules_of(got)[name].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(mine[key], value), f"{name}.{key} differs"


def pointers(loaded: LoadedCheckpoint) -> dict[str, int]:
    return {
        f"{name}.{key}": t.data_ptr() for name, m in modules_of(loaded).items() for key, t in m.state_dict().items()
    }


def one_model_budget(models: Path) -> int:
    return load_checkpoint(entry(models, SD15), CPU, torch.float32).approx_bytes + 1024


@pytest.mark.parametrize("name", [OTHER, HALF])
def test_same_architecture_switch_copies_into_the_resident_modules(models: Path, name: str) -> None:
    cache = ModelCache(one_model_budget(models), CPU, torch.float32, ram_budget_bytes=0)
    first = cache.get(entry(models, SD15))
    before = pointers(first)
    unet = first.unet
    switched = cache.get(entry(models, name))
    assert switched.unet is unet  # the same modules ...
    assert pointers(switched) == before  # ... and the same storage: nothing allocated
    assert switched.name == name
    assert switched.tokenizers[0] is not first.tokenizers[0]
    assert cache.loaded_names() == [name]
    assert (cache.stats.in_place, cache.stats.disk_reads, cache.stats.checkpoint_loads) == (1, 2, 2)
    # the file's own dtype (float16 for HALF) cast into the float32 modules, as a fresh load casts it
    assert_same_weights(switched, load_checkpoint(entry(models, name), CPU, torch.float32))


def test_ram_tier_makes_a_switch_back_a_copy_without_a_file_read(models: Path) -> None:
    cache = ModelCache(one_model_budget(models), CPU, torch.float32, ram_budget_bytes=10**9)
    for name in (SD15, OTHER, SD15, OTHER):
        cache.get(entry(models, name))
    assert cache.stats.disk_reads == 2
    assert cache.stats.ram_hits == 2
    assert cache.stats.in_place == 3
    report = cache.report()
    assert report.hits == {"device": 0, "ram": 2, "disk": 2}
    assert report.bytes["ram"] > 0
    assert report.bytes["device"] == cache.loaded_bytes
    back = cache.get(entry(models, SD15))
    assert_same_weights(back, load_checkpoint(entry(models, SD15), CPU, torch.float32))
    small = ModelCache(one_model_budget(models), CPU, torch.float32, ram_budget_bytes=1000)
    small.get(entry(models, SD15))
    small.get(entry(models, OTHER))
    small.get(entry(models, SD15))
    assert small.stats.disk_reads == 3  # over the RAM budget: nothing kept
    assert small.report().bytes["ram"] == 0


def test_one_info_line_per_checkpoint_load_names_it_with_its_seconds_and_tier(
    models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = ModelCache(one_model_budget(models), CPU, torch.float32, ram_budget_bytes=10**9)
    with caplog.at_level(logging.INFO, logger="underpaint.engine"):
        for name in (SD15, OTHER, SD15, SD15):  # from disk, from disk, from the RAM tier, resident (no load)
            cache.get(entry(models, name))
    records = assert_load_lines(caplog, "checkpoint", [SD15, OTHER, SD15], tiers=["disk", "disk", "ram"])
    measured = sum(r.load_seconds for r in records)  # type: ignore[attr-defined]
    assert measured == pytest.approx(cache.stats.load_seconds, abs=0.002)
    assert cache.stats.checkpoint_loads == 3


def test_a_switch_across_families_releases_the_old_model_before_building(
    models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import underpaint.engine.loader as loader

    released: list[str] = []
    cache = ModelCache(one_model_budget(models), CPU, torch.float32, on_release=lambda c: released.append(c.name))
    old = weakref.ref(cache.get(entry(models, SD15)).unet)
    alive_at_build: list[bool] = []
    real = loader.load_checkpoint

    def build(*args: object, **kwargs: object) -> LoadedCheckpoint:
        alive_at_build.append(old() is not None)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loader, "load_checkpoint", build)
    cache.get(entry(models, "tiny-sdxl.safetensors"))
    assert alive_at_build == [False]  # the SD 1.5 modules were gone before the SDXL ones were built
    assert released == [SD15]
    assert cache.loaded_names() == ["tiny-sdxl.safetensors"]


def test_with_room_for_both_the_old_model_stays_resident(models: Path) -> None:
    cache = ModelCache(10 * one_model_budget(models), CPU, torch.float32)
    a = cache.get(entry(models, SD15))
    b = cache.get(entry(models, OTHER))
    assert a.unet is not b.unet
    assert cache.get(entry(models, SD15)) is a
    assert cache.stats.in_place == 0


def picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))


JOB = GenerationJob(
    checkpoint=SD15,
    init_image=picture(),
    prompt="a red house",
    negative_prompt="blurry",
    width=64,
    height=64,
    image_num=1,
    steps=4,
    guidance_scale=7.0,
    sampler_name=SamplerName("Euler a"),
    seed=11,
    strength=0.75,
)


def image(executor: DiffusersExecutor, job: GenerationJob) -> np.ndarray:
    return np.asarray(executor.generate(job)[0].image)


def test_executor_switch_in_place_and_prefetch_give_the_images_of_a_fresh_load(models: Path) -> None:
    budget = one_model_budget(models)
    settings = Settings(models_dir=models, device="cpu", torch_threads=1, checkpoint_cache_bytes=budget)
    switching = DiffusersExecutor(settings, ModelRegistry(models))
    switching.prefetch([OTHER])  # read while the first job runs
    first = image(switching, JOB)
    switching.cache.ram.wait()
    assert switching.cache.stats.prefetches == 1
    other = replace(JOB, checkpoint=OTHER)
    switched = image(switching, other)
    assert switching.cache.stats.ram_hits == 1  # the prefetched weights, not the file
    assert switching.cache.stats.in_place == 1
    assert switching.cache.stats.disk_reads == 2  # SD15 on the task path, OTHER ahead of its task
    gc.collect()
    fresh = DiffusersExecutor(settings.with_overrides(checkpoint_ram_cache_bytes=0), ModelRegistry(models))
    assert np.array_equal(switched, image(fresh, other))
    assert np.array_equal(first, image(switching, JOB))  # and back again
    assert switching.cache_report().hits == {"device": 0, "ram": 2, "disk": 1}


def test_an_inpainting_checkpoint_never_takes_a_plain_models_modules(models: Path) -> None:
    """Same config tree, but a 9-channel UNet: the shapes differ, so the plain model is released and new modules are
    built (and back again)."""
    cache = ModelCache(one_model_budget(models), CPU, torch.float32, ram_budget_bytes=10**9)
    plain = cache.get(entry(models, SD15)).unet
    inpainting = cache.get(entry(models, "tiny-sd15-inpainting.safetensors"))
    assert inpainting.unet is not plain
    assert inpainting.unet.conv_in.in_channels == 9
    assert cache.stats.in_place == 0
    reference = load_checkpoint(entry(models, "tiny-sd15-inpainting.safetensors"), CPU, torch.float32)
    assert_same_weights(inpainting, reference)
    back = cache.get(entry(models, SD15))
    assert back.unet.conv_in.in_channels == 4
    assert cache.loaded_names() == [SD15]


def test_switches_to_and_from_diffusers_folders_copy_into_the_resident_modules(models: Path) -> None:
    """Single file -> folder -> other folder -> single file -> folder, with room for one model: every switch copies
    into the first model's storage, and each model's weights equal a cold load of it (``from_pretrained`` for the
    folders). The way back comes from the RAM tier."""
    cache = ModelCache(one_model_budget(models), CPU, torch.float32, ram_budget_bytes=10**9)
    first = cache.get(entry(models, SD15))
    before = pointers(first)
    for name in (FOLDER, OTHER_FOLDER, SD15, FOLDER):
        switched = cache.get(entry(models, name))
        assert switched.unet is first.unet, name
        assert pointers(switched) == before, name
        assert switched.name == name
        assert cache.loaded_names() == [name]
        assert_same_weights(switched, load_checkpoint(entry(models, name), CPU, torch.float32))
    assert switched.config_dir == models / "checkpoint" / FOLDER
    assert cache.stats.in_place == 4
    assert cache.stats.ram_hits == 2  # SD15 and FOLDER the second time: no file read
    assert cache.stats.disk_reads == 3
    assert cache.report().bytes["ram"] > 0


def test_a_diffusers_folder_and_a_sidecar_tree_of_one_architecture_compare_equal(models: Path) -> None:
    """The folder's configs were written by ``save_pretrained`` (transformers adds ``architectures`` and the dtype),
    the sidecar's by ``save_config``/``to_json_file``: the architectures are equal all the same. A config that
    differs where no shape shows it (the VAE's scaling factor) is another architecture: new modules."""
    ckpt = models / "checkpoint"
    assert architecture_of(ckpt / FOLDER) == architecture_of(ckpt / "tiny-sd15.config")
    scaled = ckpt / "scaled-sd15-diffusers"
    shutil.copytree(ckpt / FOLDER, scaled)
    vae_config = scaled / "vae" / "config.json"
    vae_config.write_text(json.dumps({**json.loads(vae_config.read_text()), "scaling_factor": 0.13025}))
    try:
        assert architecture_of(scaled) != architecture_of(ckpt / FOLDER)
        cache = ModelCache(one_model_budget(models), CPU, torch.float32, ram_budget_bytes=0)
        first = cache.get(entry(models, FOLDER)).unet
        other = cache.get(entry(models, scaled.name))
        assert other.unet is not first
        assert other.vae_scaling_factor == 0.13025
        assert cache.stats.in_place == 0
    finally:
        shutil.rmtree(scaled)


def test_executor_switch_into_a_diffusers_folder_gives_the_images_of_a_cold_load(models: Path) -> None:
    budget = one_model_budget(models)
    settings = Settings(models_dir=models, device="cpu", torch_threads=1, checkpoint_cache_bytes=budget)
    switching = DiffusersExecutor(settings, ModelRegistry(models))
    image(switching, JOB)
    folder_job = replace(JOB, checkpoint=OTHER_FOLDER)
    switched = image(switching, folder_job)
    assert switching.cache.stats.in_place == 1
    gc.collect()
    cold = DiffusersExecutor(settings.with_overrides(checkpoint_ram_cache_bytes=0), ModelRegistry(models))
    cold_image = image(cold, folder_job)
    assert cold.cache.stats.in_place == 0
    # The weights copied in place are bit for bit those of the cold load ...
    in_place, fresh = (ex.cache.get(entry(models, OTHER_FOLDER)) for ex in (switching, cold))
    for a, b in [
        (in_place.unet, fresh.unet),
        (in_place.vae, fresh.vae),
        *zip(in_place.text_encoders, fresh.text_encoders, strict=True),
    ]:
        a_state, b_state = a.state_dict(), b.state_dict()
        assert a_state.keys() == b_state.keys()
        assert all(torch.equal(a_state[k], b_state[k]) for k in a_state)
    # ... and so are the pixels, but for the odd 1-level rounding: on some CPUs (AMD EPYC) a float kernel's result
    # depends on its tensors' memory alignment, which an in-place copy and a fresh allocation do not share.
    diff = np.abs(switched.astype(np.int16) - cold_image.astype(np.int16))
    assert diff.max() <= 1
    assert diff.mean() <= 0.001
