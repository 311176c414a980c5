"""LoRA: strengths, byte-identical removal, five at once, SD 1.5 + SDXL, hand merge, wrong base model, cache bound,\nLoCon convs against a merged conv, re-use of converted tensors, hooks removed on forget."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tests.support import adapter_pipes as tiny
from tests.support.logs import assert_load_lines

from underpaint.demo import adapters as demo
from underpaint.engine.adapters.lora import LoraManager, adapter_name
from underpaint.engine.job import JobError
from underpaint.registry import ModelEntry

transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _kohya(
    models: Path, loaded: tiny.TinyLoaded, name: str, seed: int, conv: bool = False, rank: int = 4, alpha: float = 2.0
) -> list[demo.LoraLayer]:
    encoders = tiny.text_encoders(loaded)
    layers = demo.lora_layers(
        loaded.pipe.unet, encoders, sdxl=loaded.is_sdxl, seed=seed, conv=conv, rank=rank, alpha=alpha
    )
    demo.save_kohya_lora(models / "lora" / f"{name}.safetensors", layers)
    return layers


def _hand_merge(loaded: tiny.TinyLoaded, merges: list[tuple[list[demo.LoraLayer], float]]) -> None:
    """A1111's merge: W += s * alpha/rank * up @ down, on the plain (never LoRA'd) modules."""
    with torch.no_grad():
        for layers, strength in merges:
            for layer in layers:
                module = getattr(loaded.pipe, layer.component).get_submodule(layer.module)
                module.weight += strength * layer.delta()


@pytest.fixture
def models(tmp_path: Path) -> Path:
    (tmp_path / "lora").mkdir()
    return tmp_path


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
def test_strength_scales_effect_and_zero_or_removal_is_byte_identical(models: Path, sdxl: bool) -> None:
    loaded = tiny.sdxl(models) if sdxl else tiny.sd15()
    _kohya(models, loaded, "detail", seed=1, conv=True)
    entry = tiny.resolve(models, "lora", "detail")
    base = tiny.run(loaded)
    manager = LoraManager()

    manager.activate(loaded, [(entry, 0.5)])
    half = tiny.run(loaded)
    manager.activate(loaded, [(entry, 1.0)])
    full = tiny.run(loaded)
    assert _diff(half, base) > 1.0
    assert _diff(full, half) > 1.0
    assert _diff(full, base) > _diff(half, base)

    manager.activate(loaded, [(entry, 0.0)])
    assert np.array_equal(tiny.run(loaded), base)
    manager.activate(loaded, [])
    assert np.array_equal(tiny.run(loaded), base)
    # Re-enabling after a LoRA-free task restores exactly the earlier result, without a reload.
    manager.activate(loaded, [(entry, 0.5)])
    assert np.array_equal(tiny.run(loaded), half)
    assert manager.adapter_loads == 1


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
def test_loaded_lora_matches_a_hand_merge(models: Path, sdxl: bool) -> None:
    service = tiny.sdxl(models) if sdxl else tiny.sd15()
    layers = _kohya(models, service, "locon", seed=3, conv=True, rank=4, alpha=1.0)
    assert any(layer.down.dim() == 4 and layer.down.shape[-1] == 3 for layer in layers)  # LoCon 3x3 convs
    assert {layer.component for layer in layers} >= {"unet", "text_encoder"}
    LoraManager().activate(service, [(tiny.resolve(models, "lora", "locon.safetensors"), 0.7)])
    merged = tiny.sdxl(models) if sdxl else tiny.sd15()
    _hand_merge(merged, [(layers, 0.7)])
    assert _diff(tiny.run(merged), tiny.run(service)) < 0.01
    assert _diff(tiny.run(merged), tiny.run(tiny.sdxl(models) if sdxl else tiny.sd15())) > 1.0


def test_every_module_in_the_file_is_hooked(models: Path) -> None:
    loaded = tiny.sdxl(models)
    layers = _kohya(models, loaded, "xl", seed=4, conv=True)
    manager = LoraManager()
    manager.activate(loaded, [(tiny.resolve(models, "lora", "xl"), 1.0)])
    # SGM / lora_te1_ / lora_te2_ names land on the diffusers modules they were written from, and nowhere else.
    assert set(manager.hooked_layers(loaded)) == {(layer.component, layer.module) for layer in layers}
    assert len(manager.hooked_layers(loaded)) == len(layers)


def test_five_at_once_match_the_hand_merge_of_all_five(models: Path) -> None:
    service = tiny.sd15()
    sets = [(_kohya(models, service, f"l{i}", seed=10 + i, conv=i % 2 == 0), 0.2 + 0.15 * i) for i in range(5)]
    manager = LoraManager()
    manager.activate(service, [(tiny.resolve(models, "lora", f"l{i}"), s) for i, (_, s) in enumerate(sets)])
    assert len(manager.loaded_adapters(service)) == 5
    merged = tiny.sd15()
    _hand_merge(merged, sets)
    assert _diff(tiny.run(merged), tiny.run(service)) < 0.01


def test_peft_format(models: Path) -> None:
    service = tiny.sd15()
    layers = demo.lora_layers(service.pipe.unet, [service.pipe.text_encoder], sdxl=False, seed=5, alpha=2.0)
    demo.save_peft_lora(models / "lora" / "peft.safetensors", layers)
    LoraManager().activate(service, [(tiny.resolve(models, "lora", "peft"), 0.8)])
    merged = tiny.sd15()
    _hand_merge(merged, [([layer for layer in layers if layer.down.dim() == 2], 0.8)])
    assert _diff(tiny.run(merged), tiny.run(service)) < 0.01


def test_switching_sets_and_removal_on_one_pipe(models: Path) -> None:
    """The next task without LoRAs equals a task that never had one; a set equals itself whatever came before."""
    loaded = tiny.sd15()
    for i in range(3):
        _kohya(models, loaded, f"s{i}", seed=20 + i)
    a, b, c = (tiny.resolve(models, "lora", f"s{i}") for i in range(3))
    base = tiny.run(loaded)
    manager = LoraManager()
    manager.activate(loaded, [(a, 0.6), (b, 0.4)])
    ab = tiny.run(loaded)
    manager.activate(loaded, [(c, 1.0)])
    only_c = tiny.run(loaded)
    manager.activate(loaded, [])
    assert np.array_equal(tiny.run(loaded), base)
    manager.activate(loaded, [(b, 0.4), (a, 0.6)])
    assert np.array_equal(tiny.run(loaded), ab)
    fresh = tiny.sd15()
    LoraManager().activate(fresh, [(c, 1.0)])
    assert np.array_equal(tiny.run(fresh), only_c)


def test_wrong_base_model_is_a_clear_error_and_leaves_the_pipe_clean(models: Path) -> None:
    sd15, sdxl = tiny.sd15(), tiny.sdxl(models)
    _kohya(models, sdxl, "xl-only", seed=6)
    _kohya(models, sd15, "sd-only", seed=7)
    # UNet-only file of the other width: only the shapes tell.
    unet_only = [layer for layer in demo.lora_layers(sdxl.pipe.unet, [], sdxl=False, seed=8) if "attn2" in layer.key]
    demo.save_kohya_lora(models / "lora" / "xl-unet-only.safetensors", unet_only)
    manager = LoraManager()
    base = tiny.run(sd15)
    with pytest.raises(JobError, match=r"SDXL LoRA; checkpoint tiny-sd15 is SD 1.5"):
        manager.activate(sd15, [(tiny.resolve(models, "lora", "xl-only"), 1.0)])
    with pytest.raises(JobError, match=r"cross-attention width is 96, the checkpoint.s is 32"):
        manager.activate(sd15, [(tiny.resolve(models, "lora", "xl-unet-only"), 1.0)])
    with pytest.raises(JobError, match=r"SD 1.5 LoRA; checkpoint tiny-sdxl is SDXL"):
        manager.activate(sdxl, [(tiny.resolve(models, "lora", "sd-only"), 1.0)])
    assert manager.loaded_adapters(sd15) == []
    assert np.array_equal(tiny.run(sd15), base)


@pytest.mark.parametrize(
    ("filename", "content", "reason"),
    [
        ("broken.safetensors", b"not a safetensors file", "could not be read"),
        ("nolora.safetensors", None, "holds no LoRA weights"),
        ("strings.pt", {"name": "not tensors"}, "not a LoRA state dict"),
        ("unsafe.pt", {"obj": object}, "could not be read: refused to load"),
    ],
)
def test_unusable_files_fail_with_a_reason(models: Path, filename: str, content: object, reason: str) -> None:
    path = models / "lora" / filename
    if content is None:
        from safetensors.torch import save_file

        save_file({"some.weight": torch.zeros(2)}, str(path))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, str(path))
    with pytest.raises(JobError, match=reason):
        LoraManager().activate(tiny.sd15(), [(tiny.resolve(models, "lora", filename), 1.0)])


def test_cache_bound_while_cycling_twenty_sets(models: Path) -> None:
    loaded = tiny.sd15()
    entries = []
    for i in range(8):
        _kohya(models, loaded, f"c{i}", seed=30 + i, rank=2)
        entries.append(tiny.resolve(models, "lora", f"c{i}"))
    sets = [[entries[(i + k) % 8] for k in range(1 + i % 3)] for i in range(20)]
    manager = LoraManager(max_loaded_per_pipe=5, max_cached_bytes=10**9)
    first: dict[int, np.ndarray] = {}
    for round_ in range(2):
        for i, lora_set in enumerate(sets):
            manager.activate(loaded, [(e, 0.5) for e in lora_set])
            assert len(manager.loaded_adapters(loaded)) <= 5
            # what the forward passes really add: exactly this set, all of it resident
            assert manager.active_adapters(loaded) == {adapter_name(e) for e in lora_set}
            assert manager.active_adapters(loaded) <= set(manager.loaded_adapters(loaded))
            if i % 7 == 0:
                image = tiny.run(loaded)
                if round_ == 0:
                    first[i] = image
                else:  # evicted and reloaded (from the state cache) gives the same bytes
                    assert np.array_equal(image, first[i])
    assert manager.adapter_loads > 8  # eviction really happened
    assert manager.disk_reads == 8
    assert manager.conversions == 8


def test_forget_and_a_second_checkpoint_share_the_file_cache(models: Path, caplog: pytest.LogCaptureFixture) -> None:
    one, two = tiny.sd15(seed=0, name="one"), tiny.sd15(seed=1, name="two")
    _kohya(models, one, "shared", seed=40)
    entry = tiny.resolve(models, "lora", "shared")
    manager = LoraManager()
    with caplog.at_level(logging.INFO, logger="underpaint.engine"):
        manager.activate(one, [(entry, 1.0)])
        manager.activate(two, [(entry, 1.0)])
    assert manager.disk_reads == 1
    assert_load_lines(caplog, "LoRA", [entry.sd_name])  # one INFO line for the one file read: file, seconds
    assert manager.adapter_loads == 2
    manager.forget(one)
    assert manager.loaded_adapters(one) == []
    assert len(manager.loaded_adapters(two)) == 1


def test_more_than_five_is_refused_and_the_bound_must_hold_a_task(models: Path) -> None:
    with pytest.raises(ValueError, match=">= 5"):
        LoraManager(max_loaded_per_pipe=4)
    loaded = tiny.sd15()
    _kohya(models, loaded, "one", seed=41, rank=1)
    entry = tiny.resolve(models, "lora", "one")
    with pytest.raises(JobError, match="at most 5 LoRAs"):
        LoraManager().activate(loaded, [(entry, 0.1)] * 6)


def test_demo_set_on_the_real_loader(tiny_models_dir: Path, tmp_path: Path) -> None:
    """engine.demo checkpoints through engine.loader, demo LoRAs sized from their sidecar configs, names without
    extension: every file loads, changes the output, and switching off restores the checkpoint's own bytes."""
    models = tiny.demo_models(tiny_models_dir, tmp_path / "models")
    manager = LoraManager()
    for checkpoint, names in (
        ("tiny-sd15.safetensors", ["tiny-detail-sd15", "tiny-style-sd15", "tiny-peft-sd15"]),
        ("tiny-sdxl.safetensors", ["tiny-detail-sdxl", "tiny-style-sdxl"]),
    ):
        loaded = tiny.load(models, checkpoint)
        base = tiny.run(loaded)
        entries = [tiny.resolve(models, "lora", n) for n in names]
        assert all(e.is_sdxl == loaded.is_sdxl for e in entries)  # the registry's detection agrees
        for entry in entries:
            manager.activate(loaded, [(entry, 0.8)])
            assert _diff(tiny.run(loaded), base) > 1.0, entry.sd_name
        manager.activate(loaded, [])
        assert np.array_equal(tiny.run(loaded), base)


def test_pickled_kohya_file_and_duplicates_stack(models: Path) -> None:
    loaded = tiny.sd15()
    layers = _kohya(models, loaded, "st", seed=50)
    from safetensors.torch import load_file

    torch.save(load_file(str(models / "lora" / "st.safetensors")), str(models / "lora" / "pickled.pt"))
    manager = LoraManager()
    manager.activate(loaded, [(tiny.resolve(models, "lora", "st"), 0.6)])
    from_safetensors = tiny.run(loaded)
    manager.activate(loaded, [(tiny.resolve(models, "lora", "pickled"), 0.6)])
    assert np.array_equal(tiny.run(loaded), from_safetensors)
    # Listed twice: the strengths add up, as two identical <lora:...> tags do in A1111.
    manager.activate(loaded, [(tiny.resolve(models, "lora", "st"), 0.3), (tiny.resolve(models, "lora", "st"), 0.3)])
    assert np.array_equal(tiny.run(loaded), from_safetensors)
    merged = tiny.sd15()
    _hand_merge(merged, [(layers, 0.6)])
    assert _diff(tiny.run(merged), from_safetensors) < 0.01


def _exact_delta(layer: demo.LoraLayer) -> torch.Tensor:
    """``alpha/rank * up @ down`` in float64, from the values the file holds."""
    up, down = layer.up.double().flatten(1), layer.down.double().flatten(1)
    return ((up @ down) * (layer.alpha / layer.rank)).reshape(layer.up.shape[0], *layer.down.shape[1:])


def test_conv_and_linear_deltas_equal_the_merged_layer_in_the_module_dtype(models: Path) -> None:
    """A LoCon 3x3 pair, one on a strided conv, a 1x1 conv and a linear layer each add exactly what merging them
    into the weight would; a float16 file is applied in the module's float64."""
    loaded = tiny.sd15()
    unet = loaded.pipe.unet.to(torch.float64)
    layers = demo.lora_layers(unet, [], sdxl=False, seed=60, conv=True, alpha=3.0)
    gen = torch.Generator().manual_seed(61)
    strided = "down_blocks.0.downsamplers.0.conv"
    assert unet.get_submodule(strided).stride == (2, 2)
    layers.append(
        demo.LoraLayer(
            "lora_unet_" + strided.replace(".", "_"),
            "unet",
            strided,
            torch.randn(4, 16, 3, 3, generator=gen) / 12,
            torch.randn(16, 4, 1, 1, generator=gen) / 2,
            3.0,
        )
    )
    layers = [demo.LoraLayer(x.key, x.component, x.module, x.down.half(), x.up.half(), x.alpha) for x in layers]
    demo.save_kohya_lora(models / "lora" / "convs.safetensors", layers)
    LoraManager().activate(loaded, [(tiny.resolve(models, "lora", "convs"), 0.7)])

    by_path = {layer.module: layer for layer in layers}
    for path in (strided, "down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.proj_in",
                 "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"):  # fmt: skip
        module = unet.get_submodule(path)
        weight = module.weight + 0.7 * _exact_delta(by_path[path])
        if isinstance(module, torch.nn.Conv2d):
            x = torch.randn(2, module.in_channels, 9, 9, generator=gen, dtype=torch.float64)
            expected = torch.nn.functional.conv2d(x, weight, module.bias, module.stride, module.padding)
        else:
            x = torch.randn(2, 5, module.in_features, generator=gen, dtype=torch.float64)
            expected = torch.nn.functional.linear(x, weight, module.bias)
        with torch.no_grad():
            got = module(x)
        assert got.dtype == torch.float64, path
        assert got.shape == expected.shape, path
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_switching_back_and_forth_gives_the_images_of_fresh_pipes(models: Path) -> None:
    loaded = tiny.sd15()
    _kohya(models, loaded, "a", seed=70, conv=True)
    _kohya(models, loaded, "b", seed=71)
    a, b = tiny.resolve(models, "lora", "a"), tiny.resolve(models, "lora", "b")
    sets: dict[str, list[tuple[ModelEntry, float]]] = {
        "a": [(a, 0.8)], "ab": [(a, 0.3), (b, 0.9)], "b-neg": [(b, -0.5)], "none": []
    }  # fmt: skip
    fresh = {}
    for key, lora_set in sets.items():
        pipe = tiny.sd15()
        LoraManager().activate(pipe, lora_set)
        fresh[key] = tiny.run(pipe)
    assert len({image.tobytes() for image in fresh.values()}) == 4
    manager = LoraManager()
    for key in ("a", "ab", "none", "b-neg", "a", "none", "ab", "b-neg", "a"):
        manager.activate(loaded, sets[key])
        assert np.array_equal(tiny.run(loaded), fresh[key]), key
    assert manager.adapter_loads == 2
    assert manager.disk_reads == 2


def test_converted_tensors_are_reused_not_reread_or_reconverted(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from underpaint.engine.adapters import lora as lora_module

    calls = {"read": 0, "convert": 0}
    real_read, real_convert = lora_module.read_lora_file, lora_module.convert_lora

    def read(path: Path) -> dict[str, torch.Tensor]:
        calls["read"] += 1
        return real_read(path)

    def convert(state: dict[str, torch.Tensor], loaded: object) -> dict[tuple[str, str], lora_module.LoraPair]:
        calls["convert"] += 1
        return real_convert(state, loaded)

    monkeypatch.setattr(lora_module, "read_lora_file", read)
    monkeypatch.setattr(lora_module, "convert_lora", convert)
    one, two = tiny.sd15(seed=0, name="one"), tiny.sd15(seed=1, name="two")
    for i in range(6):
        _kohya(models, one, f"r{i}", seed=80 + i, rank=2)
    entries = [tiny.resolve(models, "lora", f"r{i}") for i in range(6)]
    manager = LoraManager(max_loaded_per_pipe=5)
    manager.activate(one, [(entries[0], 1.0)])
    first = tiny.run(one)
    manager.activate(two, [(entries[0], 1.0)])  # another checkpoint: placed again, from the cache
    manager.activate(one, [(e, 0.2) for e in entries[1:]])  # evicts entries[0] from `one`
    assert adapter_name(entries[0]) not in manager.loaded_adapters(one)
    manager.activate(one, [(entries[0], 1.0)])  # back on `one`: placed again, still from the cache
    assert np.array_equal(tiny.run(one), first)
    assert calls == {"read": 6, "convert": 6}
    assert manager.disk_reads == 6
    assert manager.conversions == 6
    assert manager.adapter_loads == 8

    # an edited file is a new version: read and converted again
    path = entries[0].path
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 10))
    manager.activate(one, [(tiny.resolve(models, "lora", "r0"), 1.0)])
    assert calls == {"read": 7, "convert": 7}


def test_no_layer_wrong_shape_or_dora_is_refused_and_leaves_no_hook(models: Path) -> None:
    from safetensors.torch import save_file

    loaded = tiny.sd15()
    base = tiny.run(loaded)
    save_file(
        {
            "unet.not_a_block.to_q.lora_A.weight": torch.randn(4, 8),
            "unet.not_a_block.to_q.lora_B.weight": torch.randn(8, 4),
        },
        str(models / "lora" / "nowhere.safetensors"),
    )
    layers = _kohya(models, loaded, "wide", seed=90)
    proj_out = next(layer for layer in layers if layer.module == "down_blocks.0.attentions.0.proj_out")
    too_wide = torch.randn(4, 17, 1, 1)  # the layer has 16 input channels
    wrong = [layers[0], demo.LoraLayer(proj_out.key, "unet", proj_out.module, too_wide, proj_out.up, 2.0)]
    demo.save_kohya_lora(models / "lora" / "wide.safetensors", wrong)
    manager = LoraManager()
    with pytest.raises(JobError, match="LoRA nowhere matched no layer of checkpoint tiny-sd15"):
        manager.activate(loaded, [(tiny.resolve(models, "lora", "nowhere"), 1.0)])
    with pytest.raises(
        JobError, match=r"LoRA wide could not be applied to checkpoint tiny-sd15: unet.down_blocks.0.*shapes"
    ):
        manager.activate(loaded, [(tiny.resolve(models, "lora", "wide"), 1.0)])
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    dora = {f"{q}.lora_A.weight": torch.randn(4, 16), f"{q}.lora_B.weight": torch.randn(16, 4)}
    save_file({**dora, f"{q}.lora_magnitude_vector": torch.ones(16)}, str(models / "lora" / "dora.safetensors"))
    with pytest.raises(JobError, match=r"LoRA dora could not be applied .*unsupported LoRA tensors.*magnitude"):
        manager.activate(loaded, [(tiny.resolve(models, "lora", "dora"), 1.0)])
    assert manager.loaded_adapters(loaded) == []
    assert manager.hooked_layers(loaded) == []
    assert np.array_equal(tiny.run(loaded), base)


def test_forget_removes_every_hook(models: Path) -> None:
    loaded = tiny.sdxl(models)
    _kohya(models, loaded, "gone", seed=95, conv=True)
    base = tiny.run(loaded)
    components = ("unet", "text_encoder", "text_encoder_2")

    def hooks() -> int:  # transformers registers a few of its own
        return sum(len(m._forward_hooks) for c in components for m in getattr(loaded.pipe, c).modules())

    before = hooks()
    manager = LoraManager()
    manager.activate(loaded, [(tiny.resolve(models, "lora", "gone"), 1.0)])
    assert hooks() == before + len(manager.hooked_layers(loaded)) > before
    manager.forget(loaded)
    assert manager.hooked_layers(loaded) == []
    assert manager.loaded_adapters(loaded) == []
    assert hooks() == before
    assert np.array_equal(tiny.run(loaded), base)
