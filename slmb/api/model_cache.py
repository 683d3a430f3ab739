"""Completed models for the service: an in-memory LRU of loaded generators, filled from the local store or,
for models trained by workers with another ``SLMB_HOME``, from MLflow (:func:`slmb.core.tracking.fetch_model`)."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Any

from slmb.core import store
from slmb.core.generate import BatchedGenerator, Generator, load_generator

log = logging.getLogger("slmb.api")


# Models that failed a check the listing cannot make (the full check at load, or a fetch from MLflow):
# {name: (the files' stamp or the MLflow run id, reason)}. The listing shows them broken until their files change.
_failed: dict[str, tuple[Any, str]] = {}


def local_or_fetched(name: str) -> store.ModelEntry:
    """The model from the local store, copied there from MLflow first if only MLflow has it. The entry may be
    broken (``error`` set); a broken copy in MLflow raises :class:`~slmb.core.store.BrokenModelError`."""
    try:
        return store.get_model(name)
    except store.StoreError:
        store.check_model_name(name)
    from slmb.core import tracking

    try:
        tracking.fetch_model(name)
    except store.BrokenModelError as exc:
        _failed[name] = (exc.mlflow_run_id, exc.reason)
        raise
    return store.get_model(name)


class ModelCache:
    """Keeps the ``size`` most recently used generators. Every use checks the model's files as a listing does, and
    files that changed since the load (a model republished under the same name, or files overwritten in place)
    load afresh, with the full check: a model whose files turned to junk is refused, never served from memory.
    Loads of one name are serialised; different names load in parallel.

    ``batch``: concurrent requests to one model decode together, up to this many at once (a
    :class:`~slmb.core.generate.BatchedGenerator` per model; ``SLMB_GENERATE_BATCH``, 32 by default); 0 turns
    batching off (each request decodes alone in the thread pool, as before). ``exact`` (``SLMB_GENERATE_EXACT``, on
    by default): batched results bit-identical to a lone request's; off: faster batched products for large models,
    whose last bits may differ. ``SLMB_GENERATE_THREADS``: intra-op threads of each decoding thread (default: 1
    for small models, see :data:`slmb.core.generate.SMALL_MODEL_PARAMS`)."""

    def __init__(self, size: int, batch: int | None = None, exact: bool | None = None):
        self.size = max(1, size)
        env = os.environ
        self.batch = max(0, int(env.get("SLMB_GENERATE_BATCH") or 32)) if batch is None else max(0, batch)
        self.exact = env.get("SLMB_GENERATE_EXACT", "1").strip().lower() not in ("0", "false", "no", "off") \
            if exact is None else exact
        self._items: OrderedDict[tuple[str, tuple], Generator | BatchedGenerator] = OrderedDict()
        self._lock = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}

    def get(self, name: str) -> Generator | BatchedGenerator:
        with self._lock:
            name_lock = self._name_locks.setdefault(store.check_model_name(name), threading.Lock())
        with name_lock:
            entry = local_or_fetched(name)
            key = (name, entry.stamp)
            with self._lock:
                if key in self._items and not entry.error:
                    self._items.move_to_end(key)
                    return self._items[key]
                for old in [k for k in self._items if k[0] == name]:
                    _close(self._items.pop(old))
            if entry.error:
                raise store.BrokenModelError(name, entry.error)
            try:
                generator, _ = load_generator(name)
            except store.BrokenModelError as exc:
                _failed[name] = (entry.stamp, exc.reason)
                raise
            _failed.pop(name, None)
            if self.batch:
                threads = int(os.environ.get("SLMB_GENERATE_THREADS") or 0) or None
                generator = BatchedGenerator(generator, self.batch, self.exact, threads)
            with self._lock:
                self._items[key] = generator
                while len(self._items) > self.size:
                    _close(self._items.popitem(last=False)[1])
            return generator


def _close(generator: Generator | BatchedGenerator) -> None:
    """An evicted generator's decoding thread ends once its requests are done."""
    if isinstance(generator, BatchedGenerator):
        generator.close()


def list_models() -> list[dict[str, Any]]:
    """Local models, then the finished models MLflow knows and this store does not (``source: "mlflow"``):
    generation fetches those on first use."""
    models = [{**e.to_dict(), "source": "local", **_failure(e.name, e.stamp)} for e in store.list_models()]
    local = {m["model_name"] for m in models}
    try:
        from slmb.core import tracking

        remote = tracking.finished_model_runs()
    except Exception as exc:  # MLflow down: the local list is still right
        log.warning("listing MLflow models failed: %s", exc)
        return models
    for name, run in sorted(remote.items()):
        if name not in local:
            models.append({"model_name": name, "source": "mlflow", "has_structure": True,
                           "structure_file": f"runs:/{run.info.run_id}/{store.STRUCTURE}",
                           "mlflow_run_id": run.info.run_id, "task_id": run.data.tags.get("task_id"),
                           "created": run.info.end_time, "status": "ok", **_failure(name, run.info.run_id)})
    return models


def _failure(name: str, identity: Any) -> dict[str, Any]:
    """``status`` and ``error`` of a model whose files (as ``identity`` names them) failed a check here."""
    failed = _failed.get(name)
    return {"status": "broken", "error": failed[1]} if failed and failed[0] == identity else {}
