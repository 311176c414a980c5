"""Webhook test mode (``extra.webhook.test_mode``): a canned task-result event, no generation.

Novita documents only that a "simulated mock event" arrives; we end the task without generating and send its
real task-result body (``WebhookDispatcher.submit_test_event``): SUCCEED with a real downloadable sample image,
FAILED with ``FAILED_REASON`` and no images.
"""

from __future__ import annotations

import io

from PIL import Image

FAILED_REASON = "test mode: simulated failure"


def sample_png(size: int = 64) -> bytes:
    """A small generated gradient PNG used as the test-mode output image."""
    image = Image.new("RGB", (size, size))
    image.putdata([(x * 255 // size, y * 255 // size, 128) for y in range(size) for x in range(size)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
