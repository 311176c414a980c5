"""Checkpoint / VAE loading through the same code path a user's file takes, against the tiny demo models."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from underpaint.config import Settings
from underpaint.demo.checkpoints import tiny_sd15_components, tiny_sdxl_components, tiny_vae_override, write_ckpt
from underpaint.engine.devices import configure_torch_threads, pick_device, pick_dtype
from underpaint.engine.loader import (
    SD15_CONFIG,
    SDXL_CONFIG,
    LoadedCheckpoint,
    ModelCache,
    TokenizerTemplates,
    load_checkpoint,
    load_vae,
)
from underpaint.engine.weights import ModelLoadError, load_state_dict_file
from underpaint.registry import ModelEntry, ModelRegistry

CPU = torch.device("cpu")


def _entry(models: Path, kind: str, name: str) -> ModelEntry:
    entry = ModelRegistry(models).resolve(kind, name)
    assert entry is not None, f"{kind}/{name} not found"
    return entry


def _assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    got = loaded.state_dict()
    want = {k: v for k, v in original.state_dict().items() if not k.endswith("position_ids")}
    missing = set(want) - set(got)
    assert not missing, f"missing after load: {sorted(missing)[:5]}"
    for key, value in want.items():
        tensor = got[key]
        assert tensor.device.type != "meta", key
        assert torch.equal(tensor, value), f"{key} differs"


@pytest.fixture(scope="module")
def sd15(tiny_models_dir: Path) -> LoadedCheckpoint:
    return load_checkpoint(_entry(tiny_models_dir, "checkpoint", "tiny-sd15.safetensors"), CPU, torch.float32)


@pytest.fixture(scope="module")
def sdxl(tiny_models_dir: Path) -> LoadedCheckpoint:
    return load_checkpoint(_entry(tiny_models_dir, "checkpoint", "tiny-sdxl.safetensors"), CPU, torch.float32)


# ---------------------------------------------------------------------------------------------- shipped configs


def _params(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@pytest.mark.parametrize(
    ("tree", "unet_m", "te_sizes"),
    [(SD15_CONFIG, 859.5, [123.06]), (SDXL_CONFIG, 2567.5, [123.06, 694.66])],
)
def test_shipped_configs_have_the_real_shapes(tree: Path, unet_m: float, te_sizes: list[float]) -> None:
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tree / "unet"))  # type: ignore[no-untyped-call]
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(tree / "vae"))  # type: ignore[no-untyped-call]
        encoders: list[CLIPTextModel | CLIPTextModelWithProjection] = [
            CLIPTextModel(CLIPTextConfig.from_pretrained(tree / "text_encoder"))
        ]
        if (tree / "text_encoder_2").exists():
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(tree / "text_encoder_2")))
    assert _params(unet) == pytest.approx(unet_m, abs=0.1)
    assert _params(vae) == pytest.approx(83.65, abs=0.05)
    assert [_params(te) for te in encoders] == pytest.approx(te_sizes, abs=0.05)
    scheduler = json.loads((tree / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["num_train_timesteps"]) == (0.00085, 0.012, 1000)
    assert scheduler["beta_schedule"] == "scaled_linear"


def test_shipped_sdxl_details() -> None:
    unet = json.loads((SDXL_CONFIG / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
    assert unet["projection_class_embeddings_input_dim"] == 2816
    assert unet["transformer_layers_per_block"] == [1, 2, 10]
    vae = json.loads((SDXL_CONFIG / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == 0.13025
    assert vae["force_upcast"] is True
    assert json.loads((SD15_CONFIG / "vae" / "config.json").read_text())["scaling_factor"] == 0.18215


# ---------------------------------------------------------------------------------------------- single files


def test_sd15_single_file_loads_bit_identical(sd15: LoadedCheckpoint) -> None:
    original = tiny_sd15_components()
    assert not sd15.is_sdxl
    assert type(sd15.pipe).__name__ == "StableDiffusionImg2ImgPipeline"
    _assert_same_weights(sd15.unet, original["unet"])
    _assert_same_weights(sd15.vae, original["vae"])
    _assert_same_weights(sd15.text_encoders[0], original["text_encoder"])
    assert sd15.config_dir is not None
    assert sd15.config_dir.name == "tiny-sd15.config"
    assert len(sd15.tokenizers) == 1
    assert sd15.tokenizers[0]("a photo of").input_ids == [49406, 320, 1125, 539, 49407]


def test_sdxl_single_file_loads_bit_identical(sdxl: LoadedCheckpoint) -> None:
    original = tiny_sdxl_components()
    assert sdxl.is_sdxl
    assert type(sdxl.pipe).__name__ == "StableDiffusionXLImg2ImgPipeline"
    _assert_same_weights(sdxl.unet, original["unet"])
    _assert_same_weights(sdxl.vae, original["vae"])
    te1, te2 = sdxl.text_encoders
    _assert_same_weights(te1, original["text_encoder"])
    _assert_same_weights(te2, original["text_encoder_2"])
    assert isinstance(te2, CLIPTextModelWithProjection)
    projection = te2.text_projection.weight
    assert projection.device.type == "cpu"
    assert not torch.isnan(projection).any()
    assert sdxl.tokenizers[1].pad_token == "!"
    assert sdxl.tokenizers[0].pad_token == "<|endoftext|>"
    assert sdxl.vae_scaling_factor == 0.13025


def test_loaded_checkpoint_metadata(sd15: LoadedCheckpoint) -> None:
    assert sd15.prediction_type == "epsilon"
    assert sd15.betas == (0.00085, 0.012, 1000, "scaled_linear")
    assert sd15.vae_scaling_factor == 0.18215
    assert sd15.device == CPU
    assert sd15.dtype == torch.float32
    expected = sum(
        t.numel() * t.element_size()
        for m in (sd15.unet, sd15.vae, *sd15.text_encoders)
        for t in [*m.parameters(), *m.buffers()]
    )
    assert sd15.approx_bytes == expected


def test_diffusers_folder_matches_single_file(tiny_models_dir: Path, sd15: LoadedCheckpoint) -> None:
    folder = load_checkpoint(_entry(tiny_models_dir, "checkpoint", "tiny-sd15-diffusers"), CPU, torch.float32)
    assert not folder.is_sdxl
    assert folder.config_dir == tiny_models_dir / "checkpoint" / "tiny-sd15-diffusers"  # a folder is its own tree
    _assert_same_weights(folder.unet, sd15.unet)
    _assert_same_weights(folder.vae, sd15.vae)
    _assert_same_weights(folder.text_encoders[0], sd15.text_encoders[0])


def test_folder_tokenizers_are_read_once_and_reread_when_replaced(
    tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every CLIPTokenizer.from_pretrained leaks native memory (~9 MB), so a folder's tokenizer is read from disk once
    and each load gets a private copy; replacing the files on disk is noticed."""
    from transformers import CLIPTokenizer

    folder = tmp_path / "checkpoint" / "mine"
    shutil.copytree(tiny_models_dir / "checkpoint" / "tiny-sd15-diffusers", folder)
    reads: list[str] = []
    real = CLIPTokenizer.from_pretrained.__func__  # type: ignore[attr-defined]

    def counting(cls: type, /, path: str, *args: object, **kwargs: object) -> object:
        reads.append(str(path))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", classmethod(counting))
    entry = _entry(tmp_path, "checkpoint", "mine")
    templates = TokenizerTemplates()  # the model cache's (one per executor; nothing module-level)
    first = load_checkpoint(entry, CPU, torch.float32, tokenizers=templates)
    second = load_checkpoint(entry, CPU, torch.float32, tokenizers=templates)
    assert reads.count(str(folder / "tokenizer")) == 1
    assert first.tokenizers[0] is not second.tokenizers[0]  # private: embeddings add tokens per checkpoint
    assert first.tokenizers[0]("a photo").input_ids == second.tokenizers[0]("a photo").input_ids
    vocab = folder / "tokenizer" / "tokenizer.json"  # transformers 5 saves the fast tokenizer file
    os.utime(vocab, ns=(vocab.stat().st_atime_ns, vocab.stat().st_mtime_ns + 10**9))
    load_checkpoint(entry, CPU, torch.float32, tokenizers=templates)
    assert reads.count(str(folder / "tokenizer")) == 2


def test_ckpt_with_state_dict_nesting_loads(tiny_models_dir: Path, tmp_path: Path, sd15: LoadedCheckpoint) -> None:
    models = tmp_path / "models"
    write_ckpt(tiny_models_dir / "checkpoint" / "tiny-sd15.safetensors", models / "checkpoint" / "old.ckpt")
    shutil.copytree(tiny_models_dir / "checkpoint" / "tiny-sd15.config", models / "checkpoint" / "old.config")
    loaded = load_checkpoint(_entry(models, "checkpoint", "old.ckpt"), CPU, torch.float32)
    _assert_same_weights(loaded.unet, sd15.unet)
    _assert_same_weights(loaded.text_encoders[0], sd15.text_encoders[0])


class _Exploit:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "pwned"))


def test_malicious_ckpt_is_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "models" / "checkpoint" / "evil.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1), "x": _Exploit(marker)}}, str(path))
    assert pickle.loads(pickle.dumps(0)) == 0  # sanity: pickle itself works here
    with pytest.raises(ModelLoadError, match="refused"):
        load_checkpoint(_entry(tmp_path / "models", "checkpoint", "evil.ckpt"), CPU, torch.float32)
    assert not marker.exists()


def test_non_checkpoint_file_gives_clear_error(tiny_models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "checkpoint").mkdir(parents=True)
    shutil.copy2(tiny_models_dir / "vae" / "tiny-vae.safetensors", models / "checkpoint" / "misfiled.safetensors")
    (models / "checkpoint" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint"):
        load_checkpoint(_entry(models, "checkpoint", "misfiled"), CPU, torch.float32)
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        load_checkpoint(_entry(models, "checkpoint", "broken"), CPU, torch.float32)


def test_sidecar_of_the_wrong_family_is_rejected(tiny_models_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "models" / "checkpoint"
    ckpt.mkdir(parents=True)
    shutil.copy2(tiny_models_dir / "checkpoint" / "tiny-sd15.safetensors", ckpt / "x.safetensors")
    shutil.copytree(tiny_models_dir / "checkpoint" / "tiny-sdxl.config", ckpt / "x.config")
    with pytest.raises(ModelLoadError, match=r"SD 1.5 but its sidecar"):
        load_checkpoint(_entry(tmp_path / "models", "checkpoint", "x.safetensors"), CPU, torch.float32)


def test_v_pred_marker_sets_v_prediction(tiny_models_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "models" / "checkpoint"
    ckpt.mkdir(parents=True)
    sd = load_state_dict_file(tiny_models_dir / "checkpoint" / "tiny-sd15.safetensors")
    sd["v_pred"] = torch.tensor([])
    safetensors.torch.save_file(sd, str(ckpt / "vp.safetensors"))
    shutil.copytree(tiny_models_dir / "checkpoint" / "tiny-sd15.config", ckpt / "vp.config")
    loaded = load_checkpoint(_entry(tmp_path / "models", "checkpoint", "vp"), CPU, torch.float32)
    assert loaded.prediction_type == "v_prediction"
    assert loaded.pipe.scheduler.config.prediction_type == "v_prediction"


def test_wrong_kind_is_rejected(tiny_models_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a checkpoint"):
        load_checkpoint(_entry(tiny_models_dir, "vae", "tiny-vae"), CPU, torch.float32)


# ---------------------------------------------------------------------------------------------- generation


def _img2img(loaded: LoadedCheckpoint, size: int = 128, steps: int = 20) -> np.ndarray:
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    out = loaded.pipe(
        prompt="a photo of a cat",
        image=init,
        strength=0.75,
        num_inference_steps=steps,
        guidance_scale=7.0,
        generator=torch.Generator("cpu").manual_seed(1),
    ).images[0]
    return np.asarray(out)


def test_tiny_sd15_img2img_is_fast_and_deterministic(sd15: LoadedCheckpoint) -> None:
    _img2img(sd15, 64, 2)  # warm-up
    start = time.perf_counter()
    first = _img2img(sd15)
    elapsed = time.perf_counter() - start
    assert first.shape == (128, 128, 3)
    assert np.array_equal(first, _img2img(sd15))
    # ~1 s on one idle thread; generous bound because the machine is shared.
    assert elapsed < 10, elapsed


def test_tiny_sdxl_img2img_produces_a_finite_image(sdxl: LoadedCheckpoint) -> None:
    image = _img2img(sdxl, 64, 4)
    assert image.shape == (64, 64, 3)
    assert image.std() > 0


# ---------------------------------------------------------------------------------------------- VAE override


def test_vae_override_loads_its_own_weights(tiny_models_dir: Path, sd15: LoadedCheckpoint) -> None:
    before = {k: v.clone() for k, v in sd15.vae.state_dict().items()}
    vae = load_vae(_entry(tiny_models_dir, "vae", "tiny-vae"), like=sd15)
    _assert_same_weights(vae, tiny_vae_override())
    assert vae is not sd15.vae
    assert not torch.equal(vae.decoder.conv_out.weight, sd15.vae.decoder.conv_out.weight)
    assert all(torch.equal(v, sd15.vae.state_dict()[k]) for k, v in before.items())


def test_vae_override_takes_the_checkpoint_scaling(tiny_models_dir: Path, sdxl: LoadedCheckpoint) -> None:
    vae = load_vae(_entry(tiny_models_dir, "vae", "tiny-vae"), like=sdxl)
    assert vae.config["scaling_factor"] == 0.13025
    _assert_same_weights(vae, tiny_vae_override())


def test_vae_prefixed_and_diffusers_layouts(tiny_models_dir: Path, tmp_path: Path, sd15: LoadedCheckpoint) -> None:
    vae_dir = tmp_path / "models" / "vae"
    vae_dir.mkdir(parents=True)
    sd = load_state_dict_file(tiny_models_dir / "vae" / "tiny-vae.safetensors")
    torch.save({"state_dict": {"first_stage_model." + k: v for k, v in sd.items()}}, str(vae_dir / "pref.pt"))
    tiny_vae_override().save_pretrained(str(vae_dir / "folder-vae"))
    original = tiny_vae_override()
    for name in ("pref", "folder-vae"):
        vae = load_vae(_entry(tmp_path / "models", "vae", name), like=sd15)
        _assert_same_weights(vae, original)


def test_vae_sidecar_config_makes_it_standalone(tiny_models_dir: Path) -> None:
    vae = load_vae(_entry(tiny_models_dir, "vae", "tiny-vae"), "cpu", torch.float32)
    _assert_same_weights(vae, tiny_vae_override())
    assert vae.config["scaling_factor"] == 0.18215


def test_vae_that_does_not_fit_is_a_clear_error(tiny_models_dir: Path, tmp_path: Path) -> None:
    # Without sidecar or checkpoint to copy the architecture from, the shipped (real-size) config is used.
    vae_dir = tmp_path / "models" / "vae"
    vae_dir.mkdir(parents=True)
    shutil.copy2(tiny_models_dir / "vae" / "tiny-vae.safetensors", vae_dir / "lonely.safetensors")
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_vae(_entry(tmp_path / "models", "vae", "lonely"), "cpu")
    (vae_dir / "empty.safetensors").write_bytes(b"")
    safetensors.torch.save_file({"lora_unet_x.alpha": torch.ones(1)}, str(vae_dir / "lora.safetensors"))
    with pytest.raises(ModelLoadError, match="no VAE weights"):
        load_vae(_entry(tmp_path / "models", "vae", "lora"), "cpu")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_vae(_entry(tmp_path / "models", "vae", "empty"), "cpu")


# ---------------------------------------------------------------------------------------------- cache


def test_cache_hits_counts_and_evicts_lru(tiny_models_dir: Path, sd15: LoadedCheckpoint) -> None:
    one_model = sd15.approx_bytes + 1024
    cache = ModelCache(one_model, CPU, torch.float32)
    e15 = _entry(tiny_models_dir, "checkpoint", "tiny-sd15")
    exl = _entry(tiny_models_dir, "checkpoint", "tiny-sdxl")
    a = cache.get(e15)
    assert cache.get(e15) is a
    assert cache.stats.checkpoint_loads == 1
    assert cache.stats.checkpoint_hits == 1
    cache.get(exl)
    assert cache.loaded_names() == ["tiny-sdxl.safetensors"]  # over budget: the SD 1.5 model went
    assert cache.get(e15) is not a
    assert cache.stats.checkpoint_loads == 3
    assert cache.stats.evictions == 2

    roomy = ModelCache(Settings(checkpoint_cache_bytes=10**10, device="cpu"))
    assert roomy.device == CPU
    assert roomy.dtype == torch.float32
    roomy.get(e15)
    roomy.get(exl)
    roomy.get(e15)
    assert roomy.loaded_names() == ["tiny-sdxl.safetensors", "tiny-sd15.safetensors"]
    assert roomy.stats.checkpoint_loads == 2
    assert roomy.loaded_bytes > sd15.approx_bytes


def test_cache_is_thread_safe(tiny_models_dir: Path) -> None:
    cache = ModelCache(10**10, "cpu")
    entry = _entry(tiny_models_dir, "checkpoint", "tiny-sd15")
    results: list[LoadedCheckpoint] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(entry))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    assert all(r is results[0] for r in results)
    assert cache.stats.checkpoint_loads == 1


def test_cache_reloads_a_changed_file_and_caches_vaes(tiny_models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    cache = ModelCache(10**10, "cpu")
    first = cache.get(_entry(models, "checkpoint", "tiny-sd15"))
    vae_entry = _entry(models, "vae", "tiny-vae")
    vae = cache.get_vae(vae_entry, first)
    assert cache.get_vae(vae_entry, first) is vae
    assert cache.stats.vae_loads == 1
    path = models / "checkpoint" / "tiny-sd15.safetensors"
    path.touch()
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 5))
    again = cache.get(_entry(models, "checkpoint", "tiny-sd15"))
    assert again is not first
    assert cache.stats.checkpoint_loads == 2
    cache.clear()
    assert cache.loaded_names() == []
    assert cache.loaded_bytes == 0


# ---------------------------------------------------------------------------------------------- devices


def test_device_policy() -> None:
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == CPU
    assert pick_dtype(CPU) == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(ValueError, match="invalid device"):
        pick_device("floppy")
    with pytest.raises(ValueError, match="torch_threads must be >= 1"):
        configure_torch_threads(0)
    before = torch.get_num_threads()
    configure_torch_threads(None)
    assert torch.get_num_threads() == before
    configure_torch_threads(1)
    assert torch.get_num_threads() == 1


# ---------------------------------------------------------------------------------------------- real-world variants


def test_loading_never_touches_the_network(tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in ("tiny-sd15.safetensors", "tiny-sdxl.safetensors", "tiny-sd15-diffusers"):
        load_checkpoint(_entry(tiny_models_dir, "checkpoint", name), CPU, torch.float32)


def test_fp16_file_is_cast_to_the_requested_dtype(tiny_models_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "models" / "checkpoint"
    ckpt.mkdir(parents=True)
    sd = load_state_dict_file(tiny_models_dir / "checkpoint" / "tiny-sd15.safetensors")
    safetensors.torch.save_file({k: v.half() for k, v in sd.items()}, str(ckpt / "half.safetensors"))
    shutil.copytree(tiny_models_dir / "checkpoint" / "tiny-sd15.config", ckpt / "half.config")
    entry = _entry(tmp_path / "models", "checkpoint", "half")
    loaded = load_checkpoint(entry, CPU, torch.float32)
    assert {p.dtype for m in (loaded.unet, loaded.vae, *loaded.text_encoders) for p in m.parameters()} == {
        torch.float32
    }
    want = tiny_sd15_components()["unet"].state_dict()["conv_in.weight"].half().float()
    assert torch.equal(loaded.unet.conv_in.weight, want)
    bf16 = load_checkpoint(entry, CPU, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert bf16.unet.dtype == torch.bfloat16
    assert bf16.approx_bytes < 0.51 * loaded.approx_bytes  # int64 position ids do not shrink


def test_files_also_load_through_diffusers_pipeline_route(tiny_models_dir: Path, sdxl: LoadedCheckpoint) -> None:
    """The files are valid for diffusers' own ``from_single_file`` with a local config (field notes 3)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_single_file(
        str(tiny_models_dir / "checkpoint" / "tiny-sdxl.safetensors"),
        config=str(tiny_models_dir / "checkpoint" / "tiny-sdxl.config"),
        tokenizer=sdxl.tokenizers[0],
        tokenizer_2=sdxl.tokenizers[1],
        local_files_only=True,
    )
    _assert_same_weights(pipe.text_encoder_2, sdxl.text_encoders[1])
    _assert_same_weights(pipe.unet, sdxl.unet)


def test_a_server_executor_loads_without_library_progress_bars(
    tiny_models_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """diffusers' and transformers' tqdm bars ("Loading pipeline components...") stay out of the server's log."""
    import diffusers.utils.logging
    import transformers

    from underpaint.engine.executor import DiffusersExecutor

    DiffusersExecutor(
        Settings(models_dir=tiny_models_dir, device="cpu", torch_threads=1), ModelRegistry(tiny_models_dir)
    )
    try:
        assert not diffusers.utils.logging.is_progress_bar_enabled()
        assert not transformers.logging.is_progress_bar_enabled()
        capfd.readouterr()
        load_checkpoint(_entry(tiny_models_dir, "checkpoint", "tiny-sd15-diffusers"), CPU, torch.float32)
        out, err = capfd.readouterr()
        assert "Loading" not in out + err
        assert "it/s]" not in out + err
    finally:  # other tests of this worker process see the libraries as they were
        diffusers.utils.logging.enable_progress_bar()
        transformers.logging.enable_progress_bar()  # type: ignore[no-untyped-call]
