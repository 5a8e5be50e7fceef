"""The case view's image: the radiograph with its Grad-CAM overlay, only where a deployment caches images.

Off by default nothing is stored, and a case says so ("image not stored (privacy default)"). With
serving's short-lived cache (:class:`cxr_core.image_cache.ImageCache`) configured, the image of an
answered request is read back while it lasts and explained on demand with the shared core's
:func:`cxr_core.explain.explain_image` — the same Grad-CAM and lung-zone shares as the served
``:explain`` — on the review app's bundle (default the champion). Explanations are memoised for
a few recent cases only, and a memo is used only while the cache still holds the image, so an
expired image is gone from the page too.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from cxr_core.bundle import Predictor, load_bundle
from cxr_core.errors import InputError
from cxr_core.explain import Explanation, ExplanationUnavailableError, explain_image
from cxr_core.image_cache import ImageCache

MEMO_SIZE = 16
ImageState = Literal["not_stored", "absent", "expired", "shown", "unavailable"]


@dataclass(frozen=True)
class CaseImage:
    """What the case view shows for one item: a state, and the explanation when there is one."""

    state: ImageState
    explanation: Explanation | None = None
    note: str | None = None


def _age_s(record_time: str | None) -> float | None:
    try:
        stamp = datetime.fromisoformat(str(record_time).replace("Z", "+00:00"))
    except ValueError:
        return None
    return (datetime.now(timezone.utc) - stamp).total_seconds()


class CaseImages:
    """Cached image -> overlay + lung-zone shares for the review app; ``cache=None`` is the privacy default."""

    def __init__(self, cache: ImageCache | None, bundle: Path | str):
        self.cache = cache
        self.bundle = Path(bundle)
        self._predictor: Predictor | None = None
        self._memo: OrderedDict[tuple[str, int], Explanation] = OrderedDict()
        self._lock = threading.Lock()  # one Grad-CAM at a time: its hooks live on the shared model

    def predictor(self) -> Predictor:
        if self._predictor is None:
            self._predictor = load_bundle(self.bundle)
        return self._predictor

    def explanation(self, request_id: str, item: int) -> Explanation | None:
        """The overlay of a cached image, or None when the cache is off or no longer holds it."""
        if self.cache is None:
            return None
        data = self.cache.get(request_id, item)
        if data is None:
            self._memo.pop((request_id, item), None)
            return None
        with self._lock:
            key = (request_id, item)
            if key not in self._memo:
                self._memo[key] = explain_image(self.predictor(), data)[1]
                while len(self._memo) > MEMO_SIZE:
                    self._memo.popitem(last=False)
            self._memo.move_to_end(key)
            return self._memo[key]

    def view(self, request_id: str, item: int, record_time: str | None) -> CaseImage:
        if self.cache is None:
            return CaseImage("not_stored")
        state = self.cache.state(request_id, item)  # an expired file is deleted here
        if state != "stored":
            self._memo.pop((request_id, item), None)
            age = _age_s(record_time)  # purged already: expired if older than the TTL, else never cached
            expired = state == "expired" or age is None or age > self.cache.ttl_s
            return CaseImage("expired" if expired else "absent")
        try:
            explanation = self.explanation(request_id, item)
        except ExplanationUnavailableError as error:
            return CaseImage("unavailable", note=str(error))
        except InputError as error:
            return CaseImage("unavailable", note=f"the cached image cannot be explained ({error.code})")
        return CaseImage("shown", explanation) if explanation is not None else CaseImage("expired")
