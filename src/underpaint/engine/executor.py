"""The executor: runs ``GenerationJob``s on this process's device, one job or a batch of compatible jobs at once.

It owns the model cache (device and RAM tiers, tokenizer templates), the loaded ControlNets, annotators and
upscalers, the adapter managers and the VAE precision state (``pipeline.VaePrecision``): no engine cache or flag
lives at module level. ``generate_batch`` groups the jobs by ``job.batch_key``; for each group it resolves the
names against the registry, applies the shared adapters (checkpoint, VAE override, LoRAs), prepares each job
(embeddings, IP-Adapter, ControlNet; ``pipeline.prepare_member``), samples the group in one call
(``pipeline.sample_batch``) and builds each image's infotext (model hashes come from the registry's hash cache).
``generate`` is one job through ``generate_batch``; ``upscale`` runs an upscale job. One job at a time per executor
(one device); ``prefetch`` reads a queued task's checkpoint into the RAM tier in the background meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import diffusers.utils.logging
import torch
import transformers
from PIL import Image

from underpaint.config import Settings
from underpaint.engine import inpainting, pipeline
from underpaint.engine.adapters.controlnet import ControlNetCache
from underpaint.engine.adapters.embeddings import EmbeddingManager, EmbeddingPlan
from underpaint.engine.adapters.ip_adapter import IPAdapterManager
from underpaint.engine.adapters.lora import LoraManager
from underpaint.engine.conditioning import TextEncoderBundle
from underpaint.engine.devices import configure_torch_threads, parse_dtype, pick_device, pick_dtype
from underpaint.engine.job import (
    GeneratedImage,
    GenerationJob,
    JobError,
    JobOutcome,
    Progress,
    ProgressCallback,
    UpscaleJob,
    batch_key,
)
from underpaint.engine.loader import LoadedCheckpoint, ModelCache
from underpaint.engine.memory import OutOfMemory, free_device_memory, is_out_of_memory, oom_message, release_frames
from underpaint.engine.metadata import InfotextParams, build_infotext
from underpaint.engine.model_tiers import ModelCacheReport
from underpaint.engine.preprocessors import AnnotatorCache
from underpaint.engine.samplers import DiscreteSchedule
from underpaint.engine.speed import DEFAULT_BACKEND
from underpaint.engine.upscalers import UpscalerCache, upscale, upscale_to
from underpaint.registry import ModelEntry, ModelRegistry, short_hash
from underpaint.vocabulary import infotext_sampler

log = logging.getLogger(__name__)


class DiffusersExecutor:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        *,
        dtype: torch.dtype | None = None,
        compile_backend: str | Callable[..., Any] = DEFAULT_BACKEND,
        vae_precision: pipeline.VaePrecision | None = None,
    ) -> None:
        configure_torch_threads(settings.torch_threads)
        # transformers prints long "missing/unexpected keys" load reports for partial state dicts; they are noise.
        transformers.logging.set_verbosity_error()
        # and their tqdm bars ("Loading pipeline components...", "Loading weights") would spill raw into the server's
        # log: the model-load log line says what was loaded and how long it took instead.
        transformers.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()
        self.settings = settings
        self.registry = registry
        self.compile_backend = compile_backend  # torch.compile's backend when settings.compile (tests: eager)
        self.device = pick_device(settings.device)
        # tests pass float64 to compare results without rounding
        self.dtype = dtype or pick_dtype(self.device, settings.dtype)
        # The VAE's dtype: the vae_dtype setting, and the VAEs that fell back to float32 after a NaN.
        self.vae_precision = vae_precision or pipeline.VaePrecision(parse_dtype(settings.vae_dtype))
        self.loras = LoraManager()
        self.embeddings = EmbeddingManager()
        self.ip_adapters = IPAdapterManager()
        self.cache = ModelCache(settings, self.device, self.dtype, on_release=self._detach)
        self.controlnets = ControlNetCache()
        self.annotators = AnnotatorCache()  # loaded ControlNet preprocessor networks
        self.upscalers = UpscalerCache(self.device, self.dtype)  # upscale tasks and hires fix
        self._lock = threading.Lock()
        self._current: LoadedCheckpoint | None = None
        self._prefetch_lock = threading.Lock()
        self._prefetch_next: list[str] = []
        self._schedules: dict[tuple[Any, ...], DiscreteSchedule] = {}

    # -- name resolution -------------------------------------------------------------------------------
    def _entry(self, kind: str, name: str) -> ModelEntry:
        entry = self.registry.resolve(kind, name)
        if entry is None:
            raise JobError(f"{kind} {name!r} is not in the models folder (it may have been removed after submit)")
        return entry

    def _schedule(self, loaded: LoadedCheckpoint) -> DiscreteSchedule:
        key = (*loaded.betas, loaded.is_sdxl)
        if key not in self._schedules:
            beta_start, beta_end, n, kind = loaded.betas
            self._schedules[key] = DiscreteSchedule.from_betas(beta_start, beta_end, n, kind, is_sdxl=loaded.is_sdxl)
        return self._schedules[key]

    @contextmanager
    def _vae(self, loaded: LoadedCheckpoint, job: GenerationJob) -> Iterator[Any]:
        if not job.vae:
            yield loaded.vae
            return
        entry = self._entry("vae", job.vae)
        yield self.cache.get_vae(entry, loaded)

    # -- generation ------------------------------------------------------------------------------------
    def generate(
        self,
        job: GenerationJob,
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> list[GeneratedImage]:
        (outcome,) = self.generate_batch([job], [on_progress], [should_cancel])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def generate_batch(
        self,
        jobs: Sequence[GenerationJob],
        on_progress: Sequence[ProgressCallback | None] | None = None,
        should_cancel: Sequence[Callable[[], bool] | None] | None = None,
    ) -> list[JobOutcome]:
        """Run several jobs, sharing one sampler call per group of compatible jobs (``batch_key``).

        Returns one outcome per job, in order: its images, or the exception that ended it (``JobCancelled``,
        ``JobError`` ...). A job that fails while being prepared (a bad image, a preprocessor error) or that is
        cancelled leaves its batch mates untouched; a failing shared sampler call is retried job by job.
        """
        progress = list(on_progress) if on_progress is not None else [None] * len(jobs)
        cancels = list(should_cancel) if should_cancel is not None else [None] * len(jobs)
        if not len(progress) == len(cancels) == len(jobs):
            raise ValueError("generate_batch needs one progress callback and one cancel check per job")
        groups: dict[object, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(batch_key(job), []).append(i)
        outcomes: list[JobOutcome | None] = [None] * len(jobs)
        with self._lock:
            for indices in groups.values():
                results = self._generate_group(
                    [jobs[i] for i in indices], [progress[i] for i in indices], [cancels[i] for i in indices]
                )
                for i, outcome in zip(indices, results, strict=True):
                    if isinstance(outcome, BaseException):
                        release_frames(outcome)  # a failed job's tensors go now, before the next group allocates
                    outcomes[i] = outcome
            if any(isinstance(o, BaseException) and is_out_of_memory(o) for o in outcomes):
                # Out of memory is a task failure, not a broken worker: each job that hit it (its batch was already
                # retried job by job) fails with a reason to act on; per-task state and the allocator's cache go.
                outcomes = [
                    OutOfMemory(oom_message(job.width, job.height, job.image_num))
                    if isinstance(o, BaseException) and is_out_of_memory(o)
                    else o
                    for job, o in zip(jobs, outcomes, strict=True)
                ]
                log.warning(
                    "out of device memory: %d task(s) failed; per-task state and the cache are freed",
                    sum(isinstance(o, OutOfMemory) for o in outcomes),
                )
                self.drop_task_state()
                free_device_memory()
        return [o if o is not None else RuntimeError("job was not run") for o in outcomes]

    def drop_task_state(self) -> None:
        """After an out-of-memory error: detach the per-task adapters (LoRA hooks and their resident weights, the
        IP-Adapter, loaded ControlNets) so the next task starts from the bare checkpoint with memory to spare."""
        loaded, self._current = self._current, None
        if loaded is not None:
            self.loras.forget(loaded)
            self.ip_adapters.activate(loaded, None, None, 0.0)
        self.controlnets.clear()

    def _detach(self, loaded: LoadedCheckpoint) -> None:
        """A checkpoint leaves the device tier (evicted, or its modules take another checkpoint's weights): its
        LoRA hooks, IP-Adapter processors and embedding slots go with it."""
        self.loras.forget(loaded)
        self.ip_adapters.activate(loaded, None, None, 0.0)
        self.ip_adapters.forget(loaded)
        self.embeddings.forget(loaded)

    # -- model switching -------------------------------------------------------------------------------
    def prefetch(self, checkpoints: Sequence[str]) -> None:
        """The checkpoints queued tasks will need next (``model_name``s, soonest first): once the next job's own
        checkpoint is resident, they are read into the RAM tier in the background while it samples."""
        with self._prefetch_lock:
            self._prefetch_next = list(checkpoints)

    def _start_prefetch(self) -> list[str]:
        with self._prefetch_lock:
            names, self._prefetch_next = self._prefetch_next, []
        started = []
        for name in names:
            entry = self.registry.resolve("checkpoint", name)
            if entry is not None and self.cache.prefetch(entry):
                started.append(entry.sd_name)
        return started

    def cache_report(self) -> ModelCacheReport:
        return self.cache.report()

    def _generate_group(
        self,
        jobs: list[GenerationJob],
        on_progress: list[ProgressCallback | None],
        should_cancel: list[Callable[[], bool] | None],
    ) -> list[JobOutcome]:
        head = jobs[0]
        try:
            ckpt_entry = self._entry("checkpoint", head.checkpoint)
            self._current = None  # release before load: the cache may free the old model's memory first
            # The refiner first: loading the base after it can never copy into the refiner's modules (another
            # architecture), while the other order could release the base's adapters (LoRA hooks).
            refiner = self._refiner(ckpt_entry, head)
            loaded = self.cache.get(ckpt_entry)
            self._current = loaded
            self._start_prefetch()
            self._speed_up(loaded)
            lora_entries = [(self._entry("lora", spec.name), spec.strength) for spec in head.loras]
            self.loras.activate(loaded, lora_entries)  # checks each LoRA's base model from its keys and shapes
            if not any(job.ip_adapters for job in jobs):
                self.ip_adapters.activate(loaded, None, None, 0.0)
            vae_hash = short_hash(self.registry.hash_sha256(self._entry("vae", head.vae))) if head.vae else None
            model_hash = short_hash(self.registry.hash_sha256(ckpt_entry))
            hires_upscale = self._hires_upscale(head)
        except Exception as exc:  # shared by every job of the group (same checkpoint, LoRAs and VAE)
            return [exc] * len(jobs)
        outcomes: list[JobOutcome | None] = [None] * len(jobs)
        with self._vae(loaded, head) as vae:
            components = self._components(
                loaded, vae, upscale=hires_upscale, refiner=None if refiner is None else refiner[0]
            )
            members: list[pipeline.Member] = []
            plans: dict[int, EmbeddingPlan] = {}
            for i, job in enumerate(jobs):
                try:
                    plan, inputs = self._inputs(loaded, job)
                    members.append(pipeline.prepare_member(components, inputs, on_progress[i], should_cancel[i]))
                    plans[i] = plan
                except Exception as exc:  # this job alone fails (bad image, preprocessor, embedding ...)
                    outcomes[i] = exc
            ready = [i for i in range(len(jobs)) if outcomes[i] is None]
            if ready:
                sampled = pipeline.sample_batch(components, pipeline.batch_spec_of(head), members)
                for i, result in zip(ready, sampled, strict=True):
                    outcomes[i] = (
                        result
                        if isinstance(result, BaseException)
                        else self._images(
                            jobs[i], plans[i], result, ckpt_entry, model_hash, lora_entries, vae_hash, refiner
                        )
                    )
        return [o if o is not None else RuntimeError("job was not run") for o in outcomes]

    def _inputs(self, loaded: LoadedCheckpoint, job: GenerationJob) -> tuple[EmbeddingPlan, pipeline.PipelineInputs]:
        plan = self.embeddings.apply(
            loaded, [self._entry("textualinversion", e.name) for e in job.embeddings], job.prompt, job.negative_prompt
        )
        added_cond: dict[str, Any] = {}
        if job.ip_adapters:
            spec = job.ip_adapters[0]
            added_cond = self.ip_adapters.activate(
                loaded, self._entry("ipadapter", spec.model), spec.image, spec.strength
            )
        inputs = pipeline.PipelineInputs(
            init_image=job.init_image,
            prompt=plan.prompt,
            negative_prompt=plan.negative_prompt,
            width=job.width,
            height=job.height,
            seeds=list(pipeline.seeds_for(job.seed, job.image_num)),
            steps=job.steps,
            guidance_scale=job.guidance_scale,
            sampler_name=job.sampler,
            strength=job.strength,
            clip_skip=job.clip_skip,
            token_expansions=plan.token_expansions,
            added_cond=added_cond,
            control=self._control_hook(loaded, job),
            mask=job.mask,
            hires_fix=job.hires_fix,
        )
        return plan, inputs

    def _components(self, loaded: LoadedCheckpoint, vae: Any, **extra: Any) -> pipeline.Components:
        return pipeline.Components(
            unet=loaded.unet,
            vae=vae,
            bundle=TextEncoderBundle(
                list(loaded.tokenizers), cast(Any, list(loaded.text_encoders)), loaded.is_sdxl, loaded.is_refiner
            ),
            schedule=self._schedule(loaded),
            prediction_type=loaded.prediction_type,
            vae_scaling_factor=loaded.vae_scaling_factor,
            is_sdxl=loaded.is_sdxl,
            device=self.device,
            dtype=self.dtype,
            vae_precision=self.vae_precision,
            aesthetic_scores=pipeline.REFINER_AESTHETIC_SCORES if loaded.is_refiner else None,
            **extra,
        )

    def _refiner(self, base: ModelEntry, job: GenerationJob) -> tuple[pipeline.RefinerParts, str] | None:
        """The SDXL refiner of a job that asks for one, loaded beside the base (A1111 swaps them), with its infotext
        title "name [hash]". Only a refiner checkpoint (OpenCLIP-G alone) qualifies, and only for an SDXL base."""
        if job.refiner is None:
            return None
        entry = self._entry("checkpoint", job.refiner.checkpoint)
        if not (entry.is_sdxl and base.is_sdxl):
            raise JobError(
                f"refiner {entry.stem!r} is {entry.base_model}, the checkpoint is {base.base_model}: "
                "the refiner works with SDXL checkpoints"
            )
        refiner = self.cache.get(entry)
        if not refiner.is_refiner:
            raise JobError(f"refiner {entry.stem!r} is not an SDXL refiner checkpoint")
        title = f"{entry.stem} [{short_hash(self.registry.hash_sha256(entry))}]"
        return pipeline.RefinerParts(self._components(refiner, refiner.vae), job.refiner.switch_at), title

    def _hires_upscale(self, job: GenerationJob) -> pipeline.Upscale | None:
        """The upscaler model of a hires fix that names one (None for "Latent" or no hires fix)."""
        if job.hires_fix is None or job.hires_fix.latent:
            return None
        model = self.upscalers.get(self._entry("upscaler", job.hires_fix.upscaler).path)

        def run(image: Image.Image, width: int, height: int, should_cancel: Callable[[], bool]) -> Image.Image:
            return upscale_to(image, model, width, height, should_cancel=should_cancel)

        return run

    def _images(
        self,
        job: GenerationJob,
        plan: EmbeddingPlan,
        images: list[Image.Image],
        ckpt_entry: ModelEntry,
        model_hash: str,
        lora_entries: list[tuple[ModelEntry, float]],
        vae_hash: str | None,
        refiner: tuple[pipeline.RefinerParts, str] | None = None,
    ) -> list[GeneratedImage]:
        out = []
        for img, seed in zip(images, pipeline.seeds_for(job.seed, job.image_num), strict=True):
            params = InfotextParams(
                prompt=plan.display_prompt,
                negative_prompt=plan.display_negative_prompt,
                steps=job.steps,
                sampler_name=infotext_sampler(job.sampler_name, job.scheduler)[0],
                schedule_type=infotext_sampler(job.sampler_name, job.scheduler)[1],
                guidance_scale=job.guidance_scale,
                seed=seed,
                width=job.width,
                height=job.height,
                model_name=ckpt_entry.stem,
                model_hash=model_hash,
                strength=None if job.is_txt2img else job.strength,
                clip_skip=job.clip_skip,
                loras=tuple((e.stem, w) for e, w in lora_entries),
                vae_name=job.vae,
                vae_hash=vae_hash,
                extra=inpainting.infotext_fields(job.mask) if job.mask is not None else (),
                hires_fix=job.hires_fix,
                refiner=None if refiner is None or job.refiner is None else (refiner[1], job.refiner.switch_at),
            )
            out.append(GeneratedImage(image=img, seed=seed, infotext=build_infotext(params)))
        return out

    def _control_hook(self, loaded: LoadedCheckpoint, job: GenerationJob) -> pipeline.ControlHook | None:
        if not job.controlnets:
            return None
        from underpaint.engine.adapters.controlnet import build_control_hook

        entries = [self._entry("controlnet", u.model) for u in job.controlnets]
        annotators = self.registry.models_dir / "annotator"
        units = list(job.controlnets)
        if job.mask is not None and job.mask.full_res and job.init_image is not None:
            # Only masked: each control image is cut to the same area as the init image.
            crop = inpainting.area_cropper(job.init_image.size, job.mask, job.width, job.height)
            units = [dataclasses.replace(u, image=crop(u.image)) for u in units]
        return build_control_hook(
            loaded,
            list(zip(entries, units, strict=True)),
            job.width,
            job.height,
            annotators,
            self.device,
            seed=job.seed,
            annotator_nets=self.annotators,
            controlnets=self.controlnets,
        )

    def _speed_up(self, loaded: LoadedCheckpoint) -> None:
        if self.settings.channels_last and self.device.type == "cuda":
            from underpaint.engine.speed import use_channels_last

            use_channels_last(loaded.unet, loaded.vae)
        if self.settings.compile:
            from underpaint.engine.speed import compile_unet

            compile_unet(loaded.unet, self.compile_backend)

    # -- upscale ---------------------------------------------------------------------------------------
    def upscale(
        self,
        job: UpscaleJob,
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> GeneratedImage:
        """A1111's Extras upscale of one image (``engine.upscalers``): no diffusion, the upscaler cached on this
        executor (``self.upscalers``, which hires fix uses too). Out of memory fails the job like a generation."""
        entry = self._entry("upscaler", job.upscaler)
        started = time.monotonic()

        def report(fraction: float) -> None:
            if on_progress is not None:
                remaining = (time.monotonic() - started) / fraction * (1 - fraction) if fraction > 0 else 0.0
                on_progress(Progress(fraction, remaining))

        try:
            with self._lock:
                model = self.upscalers.get(entry.path)
                image = upscale(job.image, model, job.scale, on_progress=report, should_cancel=should_cancel)
        except Exception as exc:
            if not is_out_of_memory(exc):  # also an OOM a loader turned into an UpscalerError naming the file
                raise
            oom = OutOfMemory(
                f"out of GPU memory upscaling {job.image.width}x{job.image.height} by {job.scale:g}; "
                "try a smaller image or scale (or retry when the server is less busy)"
            )
        else:
            infotext = f"Postprocess upscale by: {job.scale:g}, Postprocess upscaler: {entry.stem}"
            return GeneratedImage(image=image, seed=0, infotext=infotext)
        free_device_memory()  # outside the except block: the failed call's frames (and tensors) are gone
        raise oom

    @property
    def checkpoint_loads(self) -> int:
        return self.cache.stats.checkpoint_loads

    def release(self) -> None:
        self._current = None
        self.cache.clear()
        self.controlnets.clear()
        self.annotators.clear()
        self.upscalers.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
