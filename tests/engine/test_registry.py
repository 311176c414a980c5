"""The models folder as the API sees it: listing, name resolution, SDXL detection, rescans, file hashes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import safetensors.torch
import torch

from underpaint.registry import SD15, SDXL, FileHashCache, ModelRegistry, detect_sdxl, short_hash, unet_in_channels


def _st(path: Path, keys: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


def _registry(tmp_path: Path) -> ModelRegistry:
    reg = ModelRegistry(tmp_path / "models")
    reg.ensure_layout()
    return reg


def test_resolution_with_and_without_extension(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    m = reg.models_dir
    _st(m / "checkpoint" / "DreamShaper_8.safetensors", ["model.diffusion_model.x"])
    _st(m / "lora" / "add_detail.safetensors", ["lora_unet_down_blocks_0.lora_down.weight"])
    for name in ("DreamShaper_8.safetensors", "DreamShaper_8", "dreamshaper_8.SAFETENSORS", "dreamshaper_8"):
        entry = reg.resolve("checkpoint", name)
        assert entry is not None, name
        assert entry.sd_name == "DreamShaper_8.safetensors", name
    assert reg.resolve("checkpoint", "DreamShaper_8.ckpt") is not None  # other extension, same stem
    assert reg.resolve("checkpoint", "nope") is None
    assert reg.resolve("checkpoint", "") is None
    assert reg.resolve("lora", "add_detail") is not None
    assert reg.resolve("lora", "DreamShaper_8") is None  # kinds are separate


def test_exact_match_wins_over_case_insensitive(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    _st(reg.models_dir / "lora" / "Style.safetensors", ["lora_te_x.alpha"])
    _st(reg.models_dir / "lora" / "style.safetensors", ["lora_te_x.alpha"])
    for name in ("style", "Style"):
        entry = reg.resolve("lora", name)
        assert entry is not None
        assert entry.stem == name


def test_sd_name_in_api_and_ids(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    _st(reg.models_dir / "checkpoint" / "a.safetensors", ["model.diffusion_model.x"])
    _st(reg.models_dir / "lora" / "b.safetensors", ["lora_te_x.alpha"])
    _st(reg.models_dir / "textualinversion" / "c.pt.safetensors", ["emb_params"])
    ckpt, lora, ti = reg.list("checkpoint")[0], reg.list("lora")[0], reg.list("textualinversion")[0]
    assert ckpt.sd_name_in_api == "a.safetensors"
    assert lora.sd_name_in_api == "b"
    assert ti.sd_name_in_api == "c.pt"
    assert ckpt.id != lora.id
    assert ckpt.id > 0
    assert ModelRegistry(reg.models_dir).list("checkpoint")[0].id == ckpt.id  # stable across instances
    assert ckpt.size == (reg.models_dir / "checkpoint" / "a.safetensors").stat().st_size


def test_sdxl_detection_from_keys(tmp_path: Path) -> None:
    d = tmp_path / "m"
    cases = {
        ("checkpoint", "xl.safetensors"): (["conditioner.embedders.1.model.ln_final.weight"], True),
        ("checkpoint", "v15.safetensors"): (["cond_stage_model.transformer.text_model.x"], False),
        ("lora", "xl_te.safetensors"): (["lora_te2_text_model_encoder.alpha"], True),
        ("lora", "xl_unet.safetensors"): (["lora_unet_input_blocks_4_1_proj_in.lora_up.weight"], True),
        ("lora", "v15.safetensors"): (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"], False),
        ("textualinversion", "xl.safetensors"): (["clip_g", "clip_l"], True),
        ("textualinversion", "v15.safetensors"): (["emb_params"], False),
        ("controlnet", "xl.safetensors"): (["add_embedding.linear_1.weight"], True),
        ("controlnet", "xl_ldm.safetensors"): (["control_model.label_emb.0.0.weight"], True),
        ("controlnet", "v15.safetensors"): (["control_model.input_blocks.0.0.weight"], False),
    }
    for (kind, name), (keys, want) in cases.items():
        assert detect_sdxl(_st(d / kind / name, keys), kind) is want, (kind, name)


def test_sdxl_detection_for_folders_and_sidecars(tmp_path: Path, tiny_models_dir: Path) -> None:
    reg = ModelRegistry(tiny_models_dir)
    by_name = {e.sd_name: e for e in reg.list("checkpoint")}
    assert by_name["tiny-sdxl.safetensors"].is_sdxl
    assert by_name["tiny-sdxl.safetensors"].base_model == SDXL
    assert not by_name["tiny-sd15.safetensors"].is_sdxl
    assert by_name["tiny-sd15.safetensors"].base_model == SD15
    assert not by_name["tiny-sd15-diffusers"].is_sdxl
    cn = tmp_path / "controlnet" / "cn-xl"
    cn.mkdir(parents=True)
    (cn / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    assert detect_sdxl(cn, "controlnet")
    # A sidecar config decides for files whose keys cannot be read cheaply.
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    (ckpt / "old.ckpt").write_bytes(b"x")
    (ckpt / "old.config").mkdir()
    (ckpt / "old.config" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert detect_sdxl(ckpt / "old.ckpt", "checkpoint")


def test_sidecars_and_other_files_are_not_models(tiny_models_dir: Path) -> None:
    reg = ModelRegistry(tiny_models_dir)
    names = [e.sd_name for e in reg.list("checkpoint")]
    assert sorted(names) == [
        "tiny-sd15-diffusers",
        "tiny-sd15-inpainting.safetensors",
        "tiny-sd15.safetensors",
        "tiny-sdxl-refiner.safetensors",
        "tiny-sdxl.safetensors",
    ]
    assert [e.sd_name for e in reg.list("vae")] == ["tiny-vae.safetensors"]


def test_rescan_when_files_are_added_or_removed(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    folder = reg.models_dir / "lora"
    assert reg.list("lora") == []
    _st(folder / "new.safetensors", ["lora_te_x.alpha"])
    (folder / "notes.txt").write_text("not a model")
    (folder / ".hidden.safetensors").write_bytes(b"")
    (folder / "random_dir").mkdir()
    assert [e.sd_name for e in reg.list("lora")] == ["new.safetensors"]
    assert reg.resolve("lora", "new") is not None
    (folder / "new.safetensors").unlink()
    assert reg.list("lora") == []
    assert reg.resolve("lora", "new") is None
    assert reg.list("no-such-kind") == []


def test_hash_sha256_is_cached_by_mtime_and_size(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    path = _st(reg.models_dir / "checkpoint" / "a.safetensors", ["model.diffusion_model.x"])
    entry = reg.list("checkpoint")[0]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert reg.hash_sha256(entry) == digest
    assert short_hash(digest) == digest[:10]
    # Same size and mtime: the cache answers without reading the file (which now has other bytes).
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert reg.hash_sha256(entry) == digest
    # A new mtime invalidates it.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert reg.hash_sha256(entry) == hashlib.sha256(bytes(data)).hexdigest()


def test_hash_cache_persists_and_survives_damage(tmp_path: Path) -> None:
    store = tmp_path / "hashes.json"
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    first = FileHashCache(store).sha256(path)
    assert first == hashlib.sha256(b"hello").hexdigest()
    assert store.exists()
    stat = path.stat()
    path.write_bytes(b"HELLO")  # same size; restore the mtime so only a persisted entry explains the old answer
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert FileHashCache(store).sha256(path) == first
    store.write_text("{not json")
    assert FileHashCache(store).sha256(path) == hashlib.sha256(b"HELLO").hexdigest()


def test_folder_hash_covers_its_files(tmp_path: Path) -> None:
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "w.bin").write_bytes(b"1")
    cache = FileHashCache()
    before = cache.sha256(folder)
    assert cache.sha256(folder) == before
    assert len(before) == 64
    (folder / "unet" / "w2.bin").write_bytes(b"2")
    assert cache.sha256(folder) != before


def test_sdxl_detection_reads_ckpt_keys_without_running_code(tmp_path: Path) -> None:
    xl = tmp_path / "checkpoint" / "plain.ckpt"
    xl.parent.mkdir(parents=True)
    torch.save({"state_dict": {"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}}, str(xl))
    v15 = tmp_path / "checkpoint" / "xl_named_but_sd15.ckpt"
    torch.save({"state_dict": {"cond_stage_model.transformer.x": torch.zeros(1)}}, str(v15))
    assert detect_sdxl(xl, "checkpoint") is True
    assert detect_sdxl(v15, "checkpoint") is False
    legacy = tmp_path / "checkpoint" / "legacy_xl.ckpt"
    legacy.write_bytes(b"not a zip")  # unreadable: falls back to the name
    assert detect_sdxl(legacy, "checkpoint") is True


# ---------------------------------------------------------------------------------------------------------------
# text encoder depth (for clip_skip at submit), read without loading the model


def _te_keys(layers: int, hf_names: bool = True) -> list[str]:
    inner = "text_model.encoder" if hf_names else "encoder"
    return ["model.diffusion_model.input_blocks.0.0.weight"] + [
        f"cond_stage_model.transformer.{inner}.layers.{i}.mlp.fc1.weight" for i in range(layers)
    ]


def test_text_encoder_depth_from_safetensors_keys(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    m = reg.models_dir
    _st(m / "checkpoint" / "full.safetensors", _te_keys(12))
    _st(m / "checkpoint" / "old_names.safetensors", _te_keys(11, hf_names=False))
    _st(m / "checkpoint" / "no_te.safetensors", ["model.diffusion_model.input_blocks.0.0.weight"])
    depths = {e.sd_name: reg.text_encoder_depth(e) for e in reg.list("checkpoint")}
    assert depths == {"full.safetensors": 12, "old_names.safetensors": 11, "no_te.safetensors": None}


def test_text_encoder_depth_from_pickle_without_unpickling(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    path = reg.models_dir / "checkpoint" / "model.ckpt"
    torch.save({"state_dict": {k: torch.zeros(1) for k in _te_keys(7)}}, str(path))
    (reg.models_dir / "checkpoint" / "legacy.ckpt").write_bytes(b"\x80\x02not a zip")
    depths = {e.sd_name: reg.text_encoder_depth(e) for e in reg.list("checkpoint")}
    assert depths == {"model.ckpt": 7, "legacy.ckpt": None}


def test_text_encoder_depth_prefers_the_config_the_loader_uses(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    m = reg.models_dir / "checkpoint"
    _st(m / "side.safetensors", _te_keys(12))
    (m / "side.config" / "text_encoder").mkdir(parents=True)
    (m / "side.config" / "text_encoder" / "config.json").write_text(json.dumps({"num_hidden_layers": 5}))
    folder = m / "folder"
    (folder / "text_encoder").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "text_encoder" / "config.json").write_text(json.dumps({"num_hidden_layers": 3}))
    depths = {e.sd_name: reg.text_encoder_depth(e) for e in reg.list("checkpoint")}
    assert depths == {"side.safetensors": 5, "folder": 3}


def test_text_encoder_depth_is_cached_per_file_version(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    path = _st(reg.models_dir / "checkpoint" / "a.safetensors", _te_keys(4))
    entry = reg.resolve("checkpoint", "a")
    assert entry is not None
    assert reg.text_encoder_depth(entry) == 4
    path.write_bytes(b"garbage, no longer a safetensors file")
    assert reg.text_encoder_depth(entry) == 4  # same (path, mtime, size): not read again
    _st(path, _te_keys(6))
    os.utime(path, (entry.mtime + 10, entry.mtime + 10))
    os.utime(path.parent, (entry.mtime + 10, entry.mtime + 10))
    fresh = reg.resolve("checkpoint", "a")
    assert fresh is not None
    assert reg.text_encoder_depth(fresh) == 6


def test_text_encoder_depth_of_the_demo_checkpoints(tiny_models_dir: Path) -> None:
    reg = ModelRegistry(tiny_models_dir)
    depths = {e.sd_name: reg.text_encoder_depth(e) for e in reg.list("checkpoint") if not e.is_sdxl}
    assert depths["tiny-sd15.safetensors"] == 5  # sidecar config
    assert depths["tiny-sd15-diffusers"] == 5  # diffusers folder
    assert set(depths.values()) == {5}


def test_background_hasher_hashes_what_a_scan_finds_and_persists_it(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "lora").mkdir(parents=True)
    data = b"weights" * 1000
    (models / "lora" / "a.safetensors").write_bytes(data)
    store = tmp_path / "data" / "model_hashes.json"
    reg = ModelRegistry(models, FileHashCache(store), hash_in_background=True)
    reg.scan_and_hash()
    assert reg.hasher is not None
    reg.hasher.wait()
    assert reg.hashes.computed == 1  # done off the request path ...
    (entry,) = reg.list("lora")
    assert reg.hash_sha256(entry) == hashlib.sha256(data).hexdigest()
    assert reg.hashes.computed == 1  # ... so asking for it computes nothing
    again = ModelRegistry(models, FileHashCache(store), hash_in_background=True)
    again.scan_and_hash()
    assert again.hasher is not None
    again.hasher.wait()
    assert again.hashes.computed == 0  # persisted: a restarted process hashes nothing


def test_upscalers_are_listed_and_resolve_by_novita_names(tmp_path: Path) -> None:
    from underpaint.demo.upscalers import write_demo_upscalers

    reg = _registry(tmp_path)
    assert (reg.models_dir / "upscaler").is_dir()
    write_demo_upscalers(reg.models_dir)
    (reg.models_dir / "upscaler" / "notes.txt").write_text("not a model")
    listed = {e.sd_name_in_api: e for e in reg.list("upscaler")}
    assert set(listed) == {"RealESRGAN_x4plus_anime_6B", "RealESRNet_x4plus", "4x-tiny-esrgan", "2x-tiny-compact"}
    assert not any(e.is_sdxl for e in listed.values())
    for name in ("RealESRGAN_x4plus_anime_6B", "RealESRNet_x4plus", "RealESRNet_x4plus.pth", "realesrnet_x4plus"):
        entry = reg.resolve("upscaler", name)
        assert entry is not None, name
        assert entry.kind == "upscaler"
    assert reg.resolve("checkpoint", "RealESRNet_x4plus") is None


class _Code:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("true",))


def test_weights_problem_from_headers_without_torch(tmp_path: Path) -> None:
    from underpaint.demo.upscalers import write_demo_upscalers
    from underpaint.weight_headers import weights_problem

    for path in write_demo_upscalers(tmp_path).values():
        assert weights_problem(path) is None, path
    legacy = tmp_path / "legacy.pth"
    torch.save({"model.0.weight": torch.zeros(1)}, legacy, _use_new_zipfile_serialization=False)
    assert weights_problem(legacy) is None  # checked when loaded
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"<html>not found</html>")
    assert weights_problem(junk) == "junk.pth: neither a safetensors file nor a torch pickle"
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert (weights_problem(broken) or "").startswith("broken.safetensors: cannot read the file's header")
    empty = _st(tmp_path / "empty.safetensors", [])
    assert weights_problem(empty) == "empty.safetensors: the safetensors file holds no tensors"
    code = tmp_path / "code.pth"
    torch.save({"params": {"body.0.weight": torch.zeros(1)}, "x": _Code()}, code)
    assert "names code (posix.system)" in (weights_problem(code) or "")
    reg = _registry(tmp_path)
    (reg.models_dir / "upscaler" / "junk.pth").write_bytes(junk.read_bytes())
    (entry,) = reg.list("upscaler")
    assert reg.weights_problem(entry) == "junk.pth: neither a safetensors file nor a torch pickle"


def test_a_file_is_misfiled_only_when_its_tensor_names_are_another_kinds(tmp_path: Path, tiny_models_dir: Path) -> None:
    """Every demo file (real on-disk formats: A1111 and diffusers checkpoints, kohya and PEFT LoRAs, embeddings,
    ControlNets, IP-Adapters, ESRGAN-family upscalers) fits its own folder; the same files copied into the upscaler
    folder are named for what they are, and a file whose names say nothing certain passes (the worker decides)."""
    reg = ModelRegistry(tiny_models_dir)
    for kind in ("checkpoint", "lora", "vae", "textualinversion", "controlnet", "ipadapter", "upscaler"):
        for entry in reg.list(kind):
            assert reg.misfiled(entry) is None, (kind, entry.sd_name)
    mine = _registry(tmp_path)
    folder = mine.models_dir / "upscaler"
    strays = {
        "lora": "tiny-style-sd15.safetensors",
        "checkpoint": "tiny-sd15.safetensors",
        "vae": "tiny-vae.safetensors",
        "controlnet": "control_v11p_sd15_canny.safetensors",
    }
    for kind, name in strays.items():
        shutil.copy(tiny_models_dir / kind / name, folder / f"{kind}-file{Path(name).suffix}")
    _st(folder / "unknown.safetensors", ["head.proj.weight"])
    found = {e.stem: mine.misfiled(e) for e in mine.list("upscaler")}
    assert found["lora-file"] == (
        "lora-file.safetensors holds a LoRA's tensors, not an upscaler's (it belongs in models/lora/)"
    )
    assert found["checkpoint-file"] == (
        "checkpoint-file.safetensors holds a checkpoint's tensors, not an upscaler's (it belongs in models/checkpoint/)"
    )
    assert "holds a VAE's tensors" in (found["vae-file"] or "")
    assert "holds a ControlNet's tensors" in (found["controlnet-file"] or "")
    assert found["unknown"] is None


def test_inpainting_checkpoints_are_told_from_the_unet_input_width(tmp_path: Path, tiny_models_dir: Path) -> None:
    reg = ModelRegistry(tiny_models_dir)
    marked = {e.sd_name for e in reg.list("checkpoint") if reg.is_inpainting(e)}
    assert marked == {"tiny-sd15-inpainting.safetensors"}  # the demo's 9-channel single file, nothing else
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    m = _registry(tmp_path).models_dir
    for name, channels in (("named-inpainting.safetensors", 4), ("plain.safetensors", 9)):
        path = m / "checkpoint" / name
        safetensors.torch.save_file({conv_in: torch.zeros(8, channels, 3, 3)}, str(path))
        # A1111's old pickles: the shape is read from the pickle's structure, without torch or running code
        torch.save({"state_dict": {conv_in: torch.zeros(8, channels, 3, 3)}}, str(path.with_suffix(".ckpt")))
    assert unet_in_channels(m / "checkpoint" / "plain.safetensors") == 9
    assert unet_in_channels(m / "checkpoint" / "plain.ckpt") == 9
    assert unet_in_channels(m / "checkpoint" / "named-inpainting.ckpt") == 4
    assert unet_in_channels(tiny_models_dir / "checkpoint" / "tiny-sd15-diffusers") == 4  # unet/config.json
    reg = ModelRegistry(m)
    assert sorted(e.sd_name for e in reg.list("checkpoint") if reg.is_inpainting(e)) == [
        "plain.ckpt",
        "plain.safetensors",
    ]
    (m / "checkpoint" / "broken.safetensors").write_bytes(b"nonsense")
    assert unet_in_channels(m / "checkpoint" / "broken.safetensors") is None
    broken = reg.resolve("checkpoint", "broken.safetensors")
    assert broken is not None
    assert not reg.is_inpainting(broken)
