"""The VAE's dtype policy and the float32 retry of a NaN decode (A1111's --no-half-vae fallback)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from underpaint.engine import pipeline
from underpaint.engine.devices import parse_dtype, pick_dtype, vae_dtype_for
from underpaint.engine.job import JobError


class _StubVae(torch.nn.Module):
    """Decodes to NaN in half precision (as an overflowing SDXL VAE does), to the latent's mean in float32."""

    def __init__(self, force_upcast: bool = False, nan_in: tuple[torch.dtype, ...] = (torch.float16,)) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.config = SimpleNamespace(force_upcast=force_upcast)
        self.nan_in = nan_in
        self.decoded_in: list[torch.dtype] = []

    def decode(self, z: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        assert z.dtype == self.scale.dtype, "latents and VAE weights must share a dtype"
        self.decoded_in.append(z.dtype)
        out = torch.zeros(1, 3, 8, 8, dtype=z.dtype) + z.mean() * self.scale
        if z.dtype in self.nan_in:
            out[0, 0, 0, 0] = float("nan")
        return (out,)


def _components(vae: Any, dtype: torch.dtype, precision: pipeline.VaePrecision | None = None) -> pipeline.Components:
    return pipeline.Components(
        unet=None,
        vae=vae,
        bundle=None,  # type: ignore[arg-type]  # not used by decode
        schedule=None,  # type: ignore[arg-type]
        prediction_type="epsilon",
        vae_scaling_factor=0.5,
        is_sdxl=False,
        device=torch.device("cpu"),
        dtype=dtype,
        vae_precision=precision or pipeline.VaePrecision(),
    )


def test_nan_decode_is_retried_in_float32_and_sticks() -> None:
    vae = _StubVae()
    c = _components(vae, torch.float16)
    latents = torch.full((2, 4, 1, 1), 0.25)
    images = pipeline.decode_latents(c, latents)
    assert len(images) == 2
    # First image: fp16 (NaN) then the fp32 retry; the second goes straight to fp32 (the VAE stays upcast).
    assert vae.decoded_in == [torch.float16, torch.float32, torch.float32]
    assert vae.scale.dtype == torch.float32
    assert {img.getpixel((0, 0)) for img in images} == {(191, 191, 191)}  # (0.25 / 0.5 + 1) * 127.5, no NaN pixel


def test_the_fallback_is_the_executors_state_not_the_modules() -> None:
    """What a NaN taught belongs to the ``VaePrecision`` the executor lends every batch: a later batch with the
    same one starts in float32; another executor's (a fresh one) starts from the policy again."""
    vae = _StubVae()
    shared = pipeline.VaePrecision()
    pipeline.decode_latents(_components(vae, torch.float16, shared), torch.zeros(1, 4, 1, 1))
    assert vae.decoded_in == [torch.float16, torch.float32]
    vae.decoded_in.clear()
    pipeline.decode_latents(_components(vae, torch.float16, shared), torch.zeros(1, 4, 1, 1))
    assert vae.decoded_in == [torch.float32]  # the next batch: straight to float32
    vae.decoded_in.clear()
    pipeline.decode_latents(_components(vae, torch.float16, pipeline.VaePrecision()), torch.zeros(1, 4, 1, 1))
    assert vae.decoded_in == [torch.float16, torch.float32]  # nothing leaked through module state


def test_the_executor_lends_its_vae_precision_to_every_batch(tmp_path: Path) -> None:
    from underpaint.config import Settings
    from underpaint.engine.executor import DiffusersExecutor
    from underpaint.registry import ModelRegistry

    settings = Settings(models_dir=tmp_path, data_dir=tmp_path, vae_dtype="bfloat16", torch_threads=1)
    executor = DiffusersExecutor(settings, ModelRegistry(tmp_path))
    assert executor.vae_precision.forced == torch.bfloat16
    loaded = SimpleNamespace(
        unet=None, tokenizers=[], text_encoders=[], is_sdxl=False, is_refiner=False, betas=(0.00085, 0.012, 1000, "scaled_linear"),
        prediction_type="epsilon", vae_scaling_factor=0.18215,
    )  # fmt: skip
    first = executor._components(loaded, _StubVae())  # type: ignore[arg-type]
    second = executor._components(loaded, _StubVae())  # type: ignore[arg-type]
    assert first.vae_precision is second.vae_precision is executor.vae_precision
    other = DiffusersExecutor(settings, ModelRegistry(tmp_path))
    assert other.vae_precision is not executor.vae_precision


def test_nan_even_in_float32_fails_the_job() -> None:
    vae = _StubVae(nan_in=(torch.float16, torch.float32))
    with pytest.raises(JobError, match="NaN even in float32"):
        pipeline.decode_latents(_components(vae, torch.float16), torch.zeros(1, 4, 1, 1))


def test_force_upcast_vae_runs_float32_under_fp16_only() -> None:
    assert vae_dtype_for(torch.float16, True, None) == torch.float32
    assert vae_dtype_for(torch.float16, False, None) == torch.float16
    assert vae_dtype_for(torch.bfloat16, True, None) == torch.bfloat16  # bf16 has float32's exponent range
    assert vae_dtype_for(torch.float16, True, torch.float16) == torch.float16  # forced by vae_dtype
    vae = _StubVae(force_upcast=True)
    pipeline.decode_latents(_components(vae, torch.float16), torch.zeros(1, 4, 1, 1))
    assert vae.decoded_in == [torch.float32]


def test_vae_dtype_setting_forces_the_vae() -> None:
    vae = _StubVae(nan_in=())
    forced = pipeline.VaePrecision(torch.bfloat16)
    pipeline.decode_latents(_components(vae, torch.float32, forced), torch.zeros(1, 4, 1, 1))
    assert vae.decoded_in == [torch.bfloat16]


def test_dtype_settings() -> None:
    cpu = torch.device("cpu")
    assert pick_dtype(cpu) == torch.float32
    assert pick_dtype(cpu, "auto") == torch.float32
    assert pick_dtype(cpu, "bfloat16") == torch.bfloat16
    assert pick_dtype(cpu, "float16") == torch.float16
    assert parse_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="invalid dtype setting 'half16'"):
        pick_dtype(cpu, "half16")
    from underpaint.config import Settings
    from underpaint.engine.loader import ModelCache

    assert ModelCache(Settings(dtype="bfloat16")).dtype == torch.bfloat16
    assert ModelCache(Settings()).dtype == torch.float32


def test_settings_and_cli_carry_the_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    from underpaint.cli import _settings, build_parser
    from underpaint.config import load_settings

    env = {"UNDERPAINT_DTYPE": "bfloat16", "UNDERPAINT_VAE_DTYPE": "float32", "UNDERPAINT_COMPILE": "true"}
    settings = load_settings(env=env)
    assert (settings.dtype, settings.vae_dtype, settings.compile) == ("bfloat16", "float32", True)
    for key in env:
        monkeypatch.delenv(key, raising=False)
    args = build_parser().parse_args(["serve", "--dtype", "float16", "--vae-dtype", "bfloat16", "--compile"])
    settings = _settings(args)
    assert (settings.dtype, settings.vae_dtype, settings.compile) == ("float16", "bfloat16", True)
    assert _settings(build_parser().parse_args(["serve"])).compile is False
