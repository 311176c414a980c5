"""Typed task requests and ``NewTask``s for tests that create tasks directly in a store (``tasks.contract``)."""

from __future__ import annotations

import uuid
from typing import Any

from underpaint.tasks.contract import (
    Img2ImgRequest,
    InpaintingRequest,
    TaskExtra,
    TaskRequest,
    TaskType,
    Txt2ImgRequest,
    load_request,
)
from underpaint.tasks.types import NewTask, TaskStore

# A 1x1 PNG: a valid image for requests whose image is never decoded in the test.
PIXEL_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"


def img2img(**fields: Any) -> Img2ImgRequest:
    """An img2img request as the API stores it (resolved seed 1, model names as registry ``sd_name``s). Read as the
    store reads it: the wire's ranges are not checked, so tests may use tiny sizes."""
    values: dict[str, Any] = {"model_name": "a.safetensors", "prompt": "a house", "image_base64": PIXEL_PNG, "seed": 1}
    request = load_request({**values, **fields, "task_type": TaskType.IMG_TO_IMG})
    assert isinstance(request, Img2ImgRequest)
    return request


def txt2img(**fields: Any) -> Txt2ImgRequest:
    values: dict[str, Any] = {"model_name": "a.safetensors", "prompt": "a house", "seed": 1}
    request = load_request({**values, **fields, "task_type": TaskType.TXT_TO_IMG})
    assert isinstance(request, Txt2ImgRequest)
    return request


def inpainting(**fields: Any) -> InpaintingRequest:
    values: dict[str, Any] = {
        "model_name": "a.safetensors",
        "prompt": "a house",
        "image_base64": PIXEL_PNG,
        "mask_image_base64": PIXEL_PNG,
        "seed": 1,
        "width": 64,
        "height": 64,
    }
    request = load_request({**values, **fields, "task_type": TaskType.INPAINTING})
    assert isinstance(request, InpaintingRequest)
    return request


def new_task(
    task_id: str | None = None,
    owner: str = "o",
    request: TaskRequest | None = None,
    extra: dict[str, Any] | None = None,
    **kw: Any,
) -> NewTask:
    """A ``NewTask`` (an img2img request unless ``request`` is given); ``extra`` as the client's JSON object."""
    return NewTask(
        task_id=task_id or uuid.uuid4().hex,
        owner=owner,
        request=request if request is not None else img2img(),
        extra=TaskExtra.model_validate(extra or {}),
        **kw,
    )


def stored_img2img(store: TaskStore, task_id: str) -> Img2ImgRequest:
    """The stored request of a task the test created as img2img."""
    request = store.get_request(task_id)
    assert isinstance(request, Img2ImgRequest), request
    return request
