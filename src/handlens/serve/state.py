"""What one service holds for its lifetime: the workspace, its catalog, the model pool, the explanation cache,
metrics, the pixel budget and the thread pools work runs in."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from handlens.core.errors import BusyError
from handlens.core.workspace import Workspace
from handlens.serve.cache import ExplanationCache
from handlens.serve.images import WORKING_SIDE, PixelBudget
from handlens.serve.metrics import Metrics
from handlens.serve.pool import ModelPool
from handlens.serve.settings import ServeSettings

T = TypeVar("T")


class State:
    """Built once by ``create_app``; routes reach it through ``deps.StateDep``.

    Work runs in three separate pools so that one kind cannot starve another: ``io_pool`` decodes images and
    loads models, ``predict_pool`` runs predict batches, ``explain_pool`` runs explanations (at most
    ``explain_concurrency`` at once). A burst of Integrated Gradients explanations therefore never holds the
    threads, or the model copy, that predictions need.
    """

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.workspace = Workspace.open(settings.workspace, settings.db_url)
        self.pool = ModelPool(self.workspace.runs_dir, settings.pool_memory_mb, settings.batch_size,
                              settings.max_wait_ms, runtime=settings.runtime,
                              onnx_cache_dir=self.workspace.cache_dir / "onnx")
        self.cache = ExplanationCache(settings.explain_cache_items)
        from handlens.serve.predictions import PredictionStore

        self.predictions = PredictionStore(self.workspace.cache_dir)
        self.metrics = Metrics()
        self.pixels = PixelBudget(settings.max_pixels_in_flight)
        self._catalog: Any = None
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0
        # each thread's malloc arena costs memory: a few threads each
        self.io_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="handlens-io")
        self.predict_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="handlens-predict")
        self.explain_pool = ThreadPoolExecutor(max_workers=settings.explain_concurrency,
                                               thread_name_prefix="handlens-explain")

    def explain_slots(self) -> asyncio.Semaphore:
        """At most ``explain_concurrency`` explanations computed at once (others wait their turn)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.explain_concurrency)
        return self._slots

    async def run_explanation(self, work: Callable[[], T]) -> T:
        """Run ``work`` in the explanation threads, at most ``explain_concurrency`` at once. A slot is held until
        the work itself ends, also when the client gave up (a 504, a closed connection): abandoned work can
        never pile up behind the limit. With ``explain_queue`` requests already waiting, 503."""
        slots = self.explain_slots()
        if slots.locked() and self._waiting >= self.settings.explain_queue:
            raise BusyError(f"{self._waiting} explanations are already waiting for the "
                            f"{self.settings.explain_concurrency} that run at once; retry shortly")
        self._waiting += 1
        try:
            await slots.acquire()
        finally:
            self._waiting -= 1
        try:
            future = asyncio.get_running_loop().run_in_executor(self.explain_pool, work)
        except BaseException:
            slots.release()
            raise
        future.add_done_callback(lambda _: slots.release())  # when the thread ends, not when the request does
        return await asyncio.shield(future)

    def working_side(self, preprocess: Any = None) -> int:
        """The longer side decoded images are scaled down to: the service's working side, or a patch-trained
        model's own working side when that is larger (0 there: full resolution)."""
        if preprocess is not None and getattr(preprocess, "patches", None):
            side = int(preprocess.working_side)
            return 0 if side == 0 else max(side, WORKING_SIDE)
        return WORKING_SIDE

    @property
    def catalog(self) -> Any:
        if self._catalog is None:
            from handlens.data.catalog import open_catalog

            self._catalog = open_catalog(self.workspace.db_url)
        return self._catalog

    def close(self) -> None:
        for pool in (self.io_pool, self.predict_pool, self.explain_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        if self._catalog is not None:
            self._catalog.close()
