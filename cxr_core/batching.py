"""Score a stream of images in batches: what reference profiles, the offline replay and evaluation share.

Batches because a model forward pass over 64 images costs far less than 64 single passes; a
stream because a data set does not need to sit in memory as bytes. Each image comes back with its
prediction (or the :class:`~cxr_core.errors.InputError` serving would answer with) and the
per-image share of its batch's wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from cxr_core.bundle import Prediction, Predictor
    from cxr_core.errors import InputError

Item = TypeVar("Item")


def predict_in_batches(predictor: "Predictor", items: Iterable[Item], image_of: Callable[[Item], bytes],
                       batch_size: int = 64) -> Iterator[tuple[Item, "Prediction | InputError", float]]:
    """``(item, prediction or error, latency_ms per image)`` for every item, in order."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    batch: list[Item] = []

    def flush() -> Iterator[tuple[Item, "Prediction | InputError", float]]:
        began = time.perf_counter()
        predictions = predictor.predict_many([image_of(item) for item in batch])
        latency = (time.perf_counter() - began) * 1000.0 / len(batch)
        yield from ((item, prediction, latency) for item, prediction in zip(batch, predictions))
        batch.clear()

    for item in items:
        batch.append(item)
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()
