"""A build decodes and encodes its uploads one encoder call's worth at a time (bounded memory: a chunk of
decoded images, batches of at most BUILD_CALL_IMAGES), and its features are bit-identical to encoding
every decoded image in one call."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from app.service import Task, TaskService
from app.service import builder as builder_module
from app.service.builder import BUILD_CALL_IMAGES, encode_views, shot_seed

from .conftest import Loop
from .test_service import TENANT, create_request


@pytest.mark.parametrize("views", [1, 3])
def test_a_build_streams_its_images_through_the_encoder_and_keeps_its_features(
    loop: Loop, service: TaskService, monkeypatch: pytest.MonkeyPatch, views: int
) -> None:
    events: list[tuple[str, int]] = []
    real_decode = builder_module.decode_image
    real_encode = service.queue.encode

    def decode(*args: Any, **kwargs: Any) -> Any:
        events.append(("decode", 1))
        return real_decode(*args, **kwargs)

    def encode(pixels: np.ndarray[Any, Any], *, bulk: bool = False) -> Any:
        events.append(("encode", int(pixels.shape[0])))
        return real_encode(pixels, bulk=bulk)

    monkeypatch.setattr(builder_module, "decode_image", decode)
    monkeypatch.setattr(service.queue, "encode", encode)
    request = create_request(("airplane", "bird", "cat"), 7, views=views)  # 21 images
    task = loop.run(service.create(TENANT, request))
    assert isinstance(task, Task)

    per_chunk = max(1, BUILD_CALL_IMAGES // views)
    decoded_not_encoded = 0
    for kind, count in events:
        if kind == "decode":
            decoded_not_encoded += 1
            assert decoded_not_encoded <= per_chunk  # never more decoded images held than one call needs
        else:
            assert count <= max(BUILD_CALL_IMAGES, views)
            decoded_not_encoded = 0
    assert sum(count for kind, count in events if kind == "encode") == 21 * views

    monkeypatch.undo()
    images = service.builder.decode(request.images)
    seeds = [shot_seed(task.task_id, i) for i in range(len(images))]
    encoder = service.encoder
    whole = encode_views(encoder.encode_crops, encoder.preprocessor, images, views, seeds, per_call=512)
    assert task.shot_features.tobytes() == whole.tobytes()
