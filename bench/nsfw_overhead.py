"""How much NSFW detection adds to a tiny-model 256x256 img2img task (target: <= 10 % of the task's wall time).

Method: build the tiny SD1.5-shaped pipeline of field-notes section 2 (random weights, offline), run
img2img at 256x256 (20 steps, strength 0.75) ``--runs`` times and take the median wall time; then run
``NsfwDetector.detect`` (model already loaded, as in a long-lived worker) on each generated image and take
the median. Overhead = detection / task. The first detection call, which loads the ONNX model, is reported
separately: it happens once per worker process. Run with one torch thread as the service does:

    OMP_NUM_THREADS=1 python bench/nsfw_overhead.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from underpaint.safety.nsfw import NsfwDetector  # noqa: E402

TOKENIZER_DIR = ROOT / "src" / "underpaint" / "engine" / "configs" / "clip_tokenizer"


def tiny_pipeline() -> Any:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # type: ignore[no-untyped-call]
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(  # type: ignore[no-untyped-call]
        block_out_channels=(32, 32, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
    )
    text_config: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 5,
        "vocab_size": 49408,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return StableDiffusionImg2ImgPipeline(  # type: ignore[no-untyped-call]
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),  # type: ignore[no-untyped-call]
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    source = Image.new("RGB", (args.size, args.size), (120, 90, 60))
    task_times: list[float] = []
    outputs: list[Image.Image] = []
    for run in range(args.runs):
        start = time.perf_counter()
        result = pipe(
            prompt="a photo of a cat",
            image=source,
            strength=0.75,
            num_inference_steps=args.steps,
            guidance_scale=7.0,
            generator=torch.Generator().manual_seed(run),
        )
        task_times.append(time.perf_counter() - start)
        outputs.append(result.images[0])

    detector = NsfwDetector()
    start = time.perf_counter()
    detector.detect(outputs[:1], 0)
    first_call = time.perf_counter() - start
    detect_times: list[float] = []
    for image in outputs:
        start = time.perf_counter()
        results = detector.detect([image], 2)
        detect_times.append(time.perf_counter() - start)
        assert results[0].valid
    detector.close()

    task = statistics.median(task_times)
    detect = statistics.median(detect_times)
    overhead = 100.0 * detect / task
    print(f"img2img {args.size}x{args.size}, {args.steps} steps, tiny SD1.5-shaped model, {args.runs} runs")
    print(f"  task wall time     median {task:.3f} s  (min {min(task_times):.3f}, max {max(task_times):.3f})")
    print(
        f"  nsfw detect/image  median {1000 * detect:.1f} ms (min {1000 * min(detect_times):.1f}, max {1000 * max(detect_times):.1f})"
    )
    print(f"  first detect call  {1000 * first_call:.1f} ms (includes loading 320n.onnx, once per worker)")
    worst = 100.0 * max(detect_times) / min(task_times)
    print(f"  overhead           {overhead:.2f} % of the task (worst pair {worst:.2f} %; budget 10 %)")
    return 0 if overhead <= 10.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
