"""LoRAs, textual-inversion embeddings and IP-Adapters applied per task to a loaded checkpoint (docs/adapters.md)."""

from __future__ import annotations


def short_reason(exc: BaseException) -> str:
    """The first line of a library error: torch/safetensors messages run to paragraphs of advice."""
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0]
    if first.startswith("Weights only load failed"):
        return "the pickle holds more than tensors and is refused for safety (torch.load weights_only)"
    return first
