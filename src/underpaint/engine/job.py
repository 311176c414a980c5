"""The engine's narrow interface: a fully validated, resolved generation job in, images out.

The API layer turns a Novita request into a ``GenerationJob`` (names already resolved against the registry,
images already decoded and checked); the worker hands it to an ``Executor``. Nothing here knows about HTTP,
tasks or storage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from underpaint.vocabulary import PreprocessorName, SamplerName


@dataclass(frozen=True)
class LoraSpec:
    name: str  # registry sd_name (file name)
    strength: float


@dataclass(frozen=True)
class EmbeddingSpec:
    name: str  # registry sd_name (file name)


@dataclass(frozen=True)
class ControlNetUnitSpec:
    model: str  # registry sd_name of the ControlNet
    image: Image.Image
    strength: float = 1.0
    preprocessor: PreprocessorName | None = None  # None = use the image as the control map
    guidance_start: float = 0.0
    guidance_end: float = 1.0


@dataclass(frozen=True)
class IPAdapterSpec:
    model: str  # registry sd_name
    image: Image.Image
    strength: float


@dataclass(frozen=True)
class GenerationJob:
    checkpoint: str  # registry sd_name of the checkpoint
    init_image: Image.Image  # RGB
    prompt: str
    negative_prompt: str
    width: int
    height: int
    image_num: int
    steps: int
    guidance_scale: float
    sampler_name: SamplerName
    seed: int  # already resolved: never -1 here
    strength: float
    clip_skip: int = 1  # A1111 meaning: 1 = last layer
    vae: str | None = None
    loras: tuple[LoraSpec, ...] = ()
    embeddings: tuple[EmbeddingSpec, ...] = ()
    controlnets: tuple[ControlNetUnitSpec, ...] = ()
    ip_adapters: tuple[IPAdapterSpec, ...] = ()


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    # A1111 "parameters" infotext, written into the output file's metadata.
    infotext: str


@dataclass(frozen=True)
class Progress:
    """Reported by the executor during sampling. ``fraction`` in [0, 1]; ``eta_seconds`` best estimate."""

    fraction: float
    eta_seconds: float


ProgressCallback = Callable[[Progress], None]


class JobCancelled(Exception):
    """Raised by an executor when ``should_cancel`` returned True."""


class JobError(Exception):
    """A failure the user can act on (missing file, wrong base model ...). ``str(exc)`` is shown as reason."""


@dataclass
class ExecutorStats:
    checkpoint_loads: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class Executor(Protocol):
    def generate(
        self,
        job: GenerationJob,
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> list[GeneratedImage]: ...
