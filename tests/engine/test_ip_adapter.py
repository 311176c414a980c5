"""IP-Adapter: scale 0 equals none, the reference image matters, .bin == .safetensors, encoder layout, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tests.support import adapter_pipes as tiny

from underpaint.demo import adapters as demo
from underpaint.engine.adapters.ip_adapter import IMAGE_ENCODERS_DIR, IPAdapterManager
from underpaint.engine.adapters.lora import LoraManager
from underpaint.engine.job import JobError
from underpaint.registry import ModelRegistry

transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _write(models: Path, loaded: tiny.TinyLoaded, name: str, seed: int = 3, encoder: str | None = None) -> None:
    ip = models / "ipadapter"
    tag = encoder or ("sdxl" if loaded.is_sdxl else "sd15")
    if not (ip / IMAGE_ENCODERS_DIR / tag).exists():
        demo.tiny_image_encoder(32, seed=5).save_pretrained(ip / IMAGE_ENCODERS_DIR / tag)
    demo.save_ip_adapter(ip / name, demo.ip_adapter_state(loaded.pipe.unet, 32, seed=seed))


def _run(loaded: tiny.TinyLoaded, embeds: dict[str, list[torch.Tensor]]) -> np.ndarray:
    return tiny.run(loaded, ip_adapter_image_embeds=embeds["image_embeds"])


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
def test_scale_zero_equals_none_and_the_reference_image_matters(tmp_path: Path, sdxl: bool) -> None:
    loaded = tiny.sdxl(tmp_path) if sdxl else tiny.sd15()
    name = f"ip-adapter_{'sdxl' if sdxl else 'sd15'}.bin"
    _write(tmp_path, loaded, name)
    entry = tiny.resolve(tmp_path, "ipadapter", name)
    base = tiny.run(loaded)
    manager = IPAdapterManager()

    full = _run(loaded, manager.activate(loaded, entry, tiny.init_image(5), 1.0))
    half = _run(loaded, manager.activate(loaded, entry, tiny.init_image(5), 0.5))
    other = _run(loaded, manager.activate(loaded, entry, tiny.init_image(9), 1.0))
    assert _diff(full, base) > 1.0
    assert _diff(half, base) > 1.0
    assert _diff(full, half) > 0.5
    assert _diff(other, full) > 0.5
    assert np.array_equal(_run(loaded, manager.activate(loaded, entry, tiny.init_image(5), 0.0)), base)
    assert manager.activate(loaded, None, None, 0.0) == {}
    assert np.array_equal(tiny.run(loaded), base)
    # Back on: same bytes as the first time (reloaded from the file cache).
    assert np.array_equal(_run(loaded, manager.activate(loaded, entry, tiny.init_image(5), 1.0)), full)
    assert manager.adapter_loads == 2


def test_bin_and_safetensors_are_the_same_adapter(tmp_path: Path) -> None:
    loaded = tiny.sd15()
    _write(tmp_path, loaded, "ip-adapter_sd15.bin", seed=4)
    _write(tmp_path, loaded, "ip-adapter_sd15.safetensors", seed=4)
    manager = IPAdapterManager()
    image = tiny.init_image(5)
    a = _run(loaded, manager.activate(loaded, tiny.resolve(tmp_path, "ipadapter", "ip-adapter_sd15.bin"), image, 1))
    b = _run(
        loaded, manager.activate(loaded, tiny.resolve(tmp_path, "ipadapter", "ip-adapter_sd15.safetensors"), image, 1)
    )
    assert np.array_equal(a, b)


def test_cfg_batch_layout(tmp_path: Path) -> None:
    loaded = tiny.sd15()
    _write(tmp_path, loaded, "ip-adapter_sd15.bin")
    entry = tiny.resolve(tmp_path, "ipadapter", "ip-adapter_sd15")
    manager = IPAdapterManager()
    (embeds,) = manager.activate(loaded, entry, tiny.init_image(5), 1.0, num_images=2)["image_embeds"]
    assert embeds.shape == (4, 1, 32)
    assert torch.count_nonzero(embeds[:2]) == 0
    assert torch.count_nonzero(embeds[2:]) > 0
    assert torch.equal(embeds[2], embeds[3])
    (no_cfg,) = manager.activate(loaded, entry, tiny.init_image(5), 1.0, do_classifier_free_guidance=False)[
        "image_embeds"
    ]
    assert torch.equal(no_cfg, embeds[2:3])


def test_the_adapter_own_encoder_folder_wins(tmp_path: Path) -> None:
    loaded = tiny.sd15()
    _write(tmp_path, loaded, "ip-adapter_sd15.bin")
    entry = tiny.resolve(tmp_path, "ipadapter", "ip-adapter_sd15")
    manager = IPAdapterManager(max_encoders=1)
    shared = manager.activate(loaded, entry, tiny.init_image(5), 1.0)["image_embeds"][0]
    demo.tiny_image_encoder(32, seed=99).save_pretrained(
        tmp_path / "ipadapter" / IMAGE_ENCODERS_DIR / "ip-adapter_sd15"
    )
    own = manager.activate(loaded, entry, tiny.init_image(5), 1.0)["image_embeds"][0]
    assert not torch.equal(shared, own)
    # The registry does not mistake encoder folders for adapters.
    assert [e.sd_name for e in ModelRegistry(tmp_path).list("ipadapter")] == ["ip-adapter_sd15.bin"]


def test_errors_are_clear(tmp_path: Path) -> None:
    sd15, sdxl = tiny.sd15(), tiny.sdxl(tmp_path)
    ip = tmp_path / "ipadapter"
    demo.save_ip_adapter(ip / "ip-adapter_sdxl.bin", demo.ip_adapter_state(sdxl.pipe.unet, 32))
    manager = IPAdapterManager()
    entry = tiny.resolve(tmp_path, "ipadapter", "ip-adapter_sdxl.bin")
    with pytest.raises(
        JobError, match=r"image encoder not found; expected a folder at .*image_encoders/ip-adapter_sdxl"
    ):
        manager.activate(sdxl, entry, tiny.init_image(), 1.0)
    demo.tiny_image_encoder(32).save_pretrained(ip / IMAGE_ENCODERS_DIR / "sd15")
    demo.tiny_image_encoder(16).save_pretrained(ip / IMAGE_ENCODERS_DIR / "sdxl")
    with pytest.raises(JobError, match=r"does not fit checkpoint tiny-sd15 \(SD 1.5\)"):
        manager.activate(sd15, entry, tiny.init_image(), 1.0)
    with pytest.raises(JobError, match="expects 32-dim image embeddings"):
        manager.activate(sdxl, entry, tiny.init_image(), 1.0)
    with pytest.raises(JobError, match="needs a reference image"):
        manager.activate(sdxl, entry, None, 1.0)
    (ip / "ip-adapter_broken.bin").write_bytes(b"nope")
    with pytest.raises(JobError, match="could not be read"):
        manager.activate(sd15, tiny.resolve(tmp_path, "ipadapter", "ip-adapter_broken.bin"), tiny.init_image(), 1.0)
    base = tiny.run(sd15)
    manager.activate(sd15, None, None, 0.0)
    assert np.array_equal(tiny.run(sd15), base)


def test_lora_and_ip_adapter_together_then_both_off(tmp_path: Path) -> None:
    loaded = tiny.sd15()
    _write(tmp_path, loaded, "ip-adapter_sd15.bin")
    layers = demo.lora_layers(loaded.pipe.unet, [loaded.pipe.text_encoder], sdxl=False, seed=1)
    demo.save_kohya_lora(tmp_path / "lora" / "detail.safetensors", layers)
    base = tiny.run(loaded)
    loras, ips = LoraManager(), IPAdapterManager()
    loras.activate(loaded, [(tiny.resolve(tmp_path, "lora", "detail"), 1.0)])
    lora_only = tiny.run(loaded)
    both = _run(
        loaded, ips.activate(loaded, tiny.resolve(tmp_path, "ipadapter", "ip-adapter_sd15"), tiny.init_image(5), 1)
    )
    assert _diff(both, lora_only) > 1.0
    ips.activate(loaded, None, None, 0.0)
    assert np.array_equal(tiny.run(loaded), lora_only)
    loras.activate(loaded, [])
    assert np.array_equal(tiny.run(loaded), base)


def test_demo_set_on_the_real_loader(tiny_models_dir: Path, tmp_path: Path) -> None:
    models = tiny.demo_models(tiny_models_dir, tmp_path / "models")
    manager = IPAdapterManager()
    for checkpoint, name in (
        ("tiny-sd15.safetensors", "ip-adapter_sd15.bin"),
        ("tiny-sdxl.safetensors", "ip-adapter_sdxl"),
    ):
        loaded = tiny.load(models, checkpoint)
        entry = tiny.resolve(models, "ipadapter", name)
        assert entry.is_sdxl == loaded.is_sdxl
        base = tiny.run(loaded)
        assert _diff(_run(loaded, manager.activate(loaded, entry, tiny.init_image(5), 1.0)), base) > 1.0
        manager.activate(loaded, None, None, 0.0)
        assert np.array_equal(tiny.run(loaded), base)


def test_unload_restores_the_checkpoint_own_attention_processors(tmp_path: Path) -> None:
    from diffusers.models.attention_processor import AttnProcessor

    loaded = tiny.sd15()
    loaded.pipe.unet.set_attn_processor(AttnProcessor())  # not diffusers' default class
    _write(tmp_path, loaded, "ip-adapter_sd15.bin")
    base = tiny.run(loaded)
    manager = IPAdapterManager()
    manager.activate(loaded, tiny.resolve(tmp_path, "ipadapter", "ip-adapter_sd15"), tiny.init_image(5), 1.0)
    manager.activate(loaded, None, None, 0.0)
    assert {type(p) for p in loaded.pipe.unet.attn_processors.values()} == {AttnProcessor}
    assert np.array_equal(tiny.run(loaded), base)
