"""MLflow tracking as an event sink (DESIGN.md §4).

The default store is ``sqlite:///$SLMB_HOME/mlflow.db`` with artifacts beside it, so nothing needs a
server and ``mlflow ui --backend-store-uri sqlite:///...`` shows the runs (``slmb serve`` runs that UI itself and
names it in ``$SLMB_MLFLOW_UI``); ``MLFLOW_TRACKING_URI`` points elsewhere. MLflow is slow to import and a remote
server may be slow or down, so :class:`MlflowSink` does all its work on a background thread: training never waits
for tracking except to close the run at the end, and any tracking failure reaches the
:class:`~slmb.core.events.Emitter` as one exception, i.e. one ``warning``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from slmb.core import events as ev
from slmb.core.spec import MODEL_NAME_RE, Config
from slmb.core.store import (
    METADATA,
    STRUCTURE,
    WEIGHTS,
    BrokenModelError,
    StoreError,
    check_model_name,
    check_task_id,
    read_model,
    save_completed,
    slmb_home,
    write_json,
)

# A tracking server that is down must cost seconds, not MLflow's default minutes of retries.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
FLUSH_EVERY_S = 5.0
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
_FINAL_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "error": "FAILED"}


class TrackingError(RuntimeError):
    pass


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{slmb_home() / 'mlflow.db'}"


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or "slmb"


def mlflow_ui_base() -> str | None:
    """Where an MLflow UI for :func:`tracking_uri` is served: the tracking server itself, or ``$SLMB_MLFLOW_UI``
    (``slmb serve`` sets it to the UI it runs); None when nothing serves one (a local store: see
    :func:`mlflow_ui_command`)."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return (os.environ.get("SLMB_MLFLOW_UI") or "").rstrip("/") or None


def mlflow_run_path(run_id: str, experiment_id: str) -> str:
    """The run's place in any MLflow UI on its store: what follows the UI's address."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def mlflow_run_url(run_id: str, experiment_id: str) -> str | None:
    """The run's page in the UI of :func:`mlflow_ui_base`; None when no UI serves the store."""
    base = mlflow_ui_base()
    return f"{base}/{mlflow_run_path(run_id, experiment_id)}" if base else None


def mlflow_ui_command() -> str | None:
    """The command that opens a UI on a local store (``mlflow ui --backend-store-uri sqlite:///...``, which serves
    http://127.0.0.1:5000); None for a tracking server, which is its own UI."""
    import shlex

    uri = tracking_uri()
    return None if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def ui_answers(base: str, timeout_s: float = 2.0) -> bool:
    """Whether an MLflow server answers at ``base`` (its ``/health``)."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy
    try:
        with opener.open(f"{base.rstrip('/')}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, values as MLflow params (strings of bounded length)."""
    out: dict[str, str] = {}
    for key, value in obj.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        elif value is not None:
            text = value if isinstance(value, str) else json.dumps(value)
            out[f"{prefix}{key}"] = text[:MAX_PARAM_LENGTH]
    return out


def request_params(request: Mapping[str, Any]) -> dict[str, str]:
    """The run's params: the request's config with every default filled in, plus dataset and model name."""
    config = Config.model_validate(request.get("config") or {}).model_dump(mode="json", exclude_none=True)
    extra = {"dataset": request.get("dataset"), "dataset_config": request.get("dataset_config"),
             "model_name": request.get("modelName") or request.get("model_name")}
    return {**flatten(config), **flatten(extra)}


def client() -> Any:
    """An ``MlflowClient`` on :func:`tracking_uri`, with short HTTP retries (imports mlflow: seconds)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    from mlflow.tracking import MlflowClient

    # MLflow and its database migrations log at INFO to the terminal the trainer is drawing on; mlflow sets its
    # logger's level when imported, so this comes after the import.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    mlflow_client = MlflowClient(uri)
    if uri.startswith("sqlite:") and uri not in _opened:
        # A new sqlite store gets its tables on first use, and MLflow does not lock that: two threads of one
        # process (the API's warm-up and `slmb serve` opening the store before its MLflow UI starts) take turns.
        with _opened_lock:
            if uri not in _opened:
                mlflow_client.search_experiments(max_results=1)
                _opened.add(uri)
    return mlflow_client


_opened: set[str] = set()  # the sqlite stores this process has opened (their tables exist)
_opened_lock = threading.Lock()


def _experiment_id(mlflow_client: Any) -> str:
    name = experiment_name()
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # The default sqlite store keeps artifacts under SLMB_HOME, not in ./mlruns of whatever the cwd is.
    location = None if "MLFLOW_TRACKING_URI" in os.environ else (slmb_home() / "mlartifacts").as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def start_run(task_id: str, request: Mapping[str, Any], mlflow_client: Any = None) -> tuple[str, str]:
    """The MLflow run of ``task_id`` as ``(experiment_id, run_id)``: created with its params and tags, or
    found again by its ``task_id`` tag when a stopped run is resumed."""
    mlflow_client = mlflow_client or client()
    experiment_id = _experiment_id(mlflow_client)
    found = mlflow_client.search_runs([experiment_id], filter_string=f"tags.task_id = '{task_id}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        logged = found[0].data.params
        mlflow_client.update_run(run_id, status="RUNNING")  # a stopped run ended KILLED; it trains again
    else:
        model_name = str(request.get("modelName") or request.get("model_name") or "")
        tags = {"task_id": task_id, "model_name": model_name, "training_status": "queued"}
        run_id = mlflow_client.create_run(experiment_id, tags=tags, run_name=model_name or None).info.run_id
        logged = {}
    from mlflow.entities import Param

    # MLflow refuses to change a logged param, so a resumed run only adds the params it did not have.
    params = [Param(k, v) for k, v in request_params(request).items() if k not in logged]
    for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
        mlflow_client.log_batch(run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])
    return experiment_id, run_id


_CLOSE = object()


class _StepPoint(NamedTuple):
    step: int
    loss: float
    lr: float
    ts: float


class MlflowSink:
    """Logs a training run to MLflow from a background thread.

    Metrics: ``train/step_loss`` and ``train/lr`` (every step, through :meth:`record_step`; else from step
    events), ``train/grad_norm``, ``train/tokens_per_sec``, ``train/mfu``, ``train/model_flops`` (step events),
    ``train/step_loss_ema`` (progress), ``train/epoch_loss`` (epoch), ``eval/train_loss`` and ``eval/val_loss``
    (eval), batched every few seconds. Artifacts: the request (the canvas JSON) as ``structure.json`` when the
    run starts; on the terminal event that again, the loss curve (``loss_curve.png``) and, when finished, the model
    (``model.safetensors`` and ``metadata.json``: see :func:`fetch_model`). Then it sets the ``training_status``
    tag and ends the run; the trainer waits for that, so the run is complete when training returns.
    """

    def __init__(self, task_id: str, request: Mapping[str, Any], *, run_id: str | None = None,
                 flush_every_s: float = FLUSH_EVERY_S, close_timeout_s: float = 120.0):
        self.task_id, self.request = task_id, dict(request)
        self.run_id, self.experiment_id = run_id, None
        self.flush_every_s, self.close_timeout_s = flush_every_s, close_timeout_s
        self._queue: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._raised = False
        self._metrics: list[Any] = []
        self._per_step = False  # the loop records every step's loss and lr (record_step): step events skip them
        self._curve: dict[str, list[tuple[int, float]]] = {"train": [], "val": []}
        self._thread = threading.Thread(target=self._work, name=f"mlflow-{task_id}", daemon=True)
        self._thread.start()

    # Main thread ------------------------------------------------------------------------------------------

    def emit(self, event: ev.Event) -> None:
        self._raise_error()
        self._queue.put(event)
        if event.terminal:
            self._wait_drained()
            self._raise_error()

    def record_step(self, step: int, loss: float, lr: float) -> None:
        """Every step's loss and learning rate, from the training loop (``step`` events come at most twice a second):
        MLflow's curves get every point. Never raises; dropped once tracking has failed."""
        if self._error is None and self._thread.is_alive():
            self._per_step = True
            self._queue.put(_StepPoint(step, loss, lr, time.time()))

    def close(self) -> None:
        self._queue.put(_CLOSE)
        self._thread.join(self.close_timeout_s)
        self._raise_error()

    def describe(self) -> dict[str, Any]:
        """The run's ids and UI link, for the completed model's metadata (empty if tracking failed)."""
        self._ready.wait(self.close_timeout_s)
        if self.run_id is None or self.experiment_id is None:
            return {}
        url = mlflow_run_url(self.run_id, self.experiment_id)
        return {"mlflow_run_id": self.run_id, "mlflow_experiment_id": self.experiment_id,
                **({"mlflow_url": url} if url else {}), "mlflow_tracking_uri": tracking_uri()}

    def _raise_error(self) -> None:
        if self._error is not None and not self._raised:
            self._raised = True
            self._queue.put(_CLOSE)  # the Emitter switches this sink off now; let the thread end
            raise TrackingError(f"MLflow tracking at {tracking_uri()} failed: {self._error}") from self._error

    def _wait_drained(self) -> None:
        drained = threading.Event()
        self._queue.put(drained)
        deadline = time.monotonic() + self.close_timeout_s
        while not drained.wait(0.1):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                break

    # Background thread ------------------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            self._client = client()
            if self.run_id is None:
                self.experiment_id, self.run_id = start_run(self.task_id, self.request, self._client)
            else:
                self.experiment_id = self._client.get_run(self.run_id).info.experiment_id
        except Exception as exc:
            self._error = exc
        finally:
            self._ready.set()
        if self._error is None:
            try:  # the canvas JSON is in the run while it trains; if this fails, the end of the run tries again
                self._log_request()
            except Exception as exc:
                logging.getLogger("slmb.tracking").debug("structure.json not logged yet: %s", exc)
        last_flush = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=self.flush_every_s)
            except queue.Empty:
                item = None
            if item is _CLOSE:
                break
            if isinstance(item, threading.Event):
                item.set()
                continue
            if self._error is not None:
                continue
            try:
                if item is not None:
                    self._handle(item)
                if self._metrics and (time.monotonic() - last_flush > self.flush_every_s
                                      or len(self._metrics) >= MAX_METRICS_PER_BATCH):
                    self._flush()
                    last_flush = time.monotonic()
            except Exception as exc:
                self._error = exc
        if self._error is None and self._metrics:
            try:
                self._flush()
            except Exception as exc:
                self._error = exc

    def _metric(self, key: str, value: float | None, event: ev.Event | _StepPoint, step: int) -> None:
        if value is not None:
            from mlflow.entities import Metric

            self._metrics.append(Metric(key, float(value), int(event.ts * 1000), step))

    def _flush(self) -> None:
        metrics, self._metrics = self._metrics, []
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])

    def _handle(self, event: ev.Event | _StepPoint) -> None:
        if isinstance(event, _StepPoint):
            self._metric("train/step_loss", event.loss, event, event.step)
            self._metric("train/lr", event.lr, event, event.step)
            self._curve["train"].append((event.step, event.loss))
        elif isinstance(event, ev.Started):
            # A default the trainer resolves from the run's length (the request's params lack it). Logged once: a
            # resumed session has it from the first, and MLflow refuses to change a logged param.
            if event.warmup_steps is not None and not event.resumed_from_step and "warmup_steps" not in (
                    self.request.get("config") or {}):
                self._client.log_param(self.run_id, "warmup_steps", str(event.warmup_steps))
        elif isinstance(event, ev.Step):
            if not self._per_step:
                self._metric("train/step_loss", event.loss, event, event.step)
                self._metric("train/lr", event.lr, event, event.step)
                self._curve["train"].append((event.step, event.loss))
            self._metric("train/grad_norm", event.grad_norm, event, event.step)
            self._metric("train/tokens_per_sec", event.tokens_per_sec, event, event.step)
            self._metric("train/mfu", event.mfu, event, event.step)
            self._metric("train/model_flops", event.model_flops, event, event.step)
        elif isinstance(event, ev.Progress):
            self._metric("train/step_loss_ema", event.loss_ema, event, event.step)
        elif isinstance(event, ev.Epoch):
            self._metric("train/epoch_loss", event.epoch_loss, event, event.step)
        elif isinstance(event, ev.Eval):
            self._metric("eval/train_loss", event.train_loss, event, event.step)
            self._metric("eval/val_loss", event.val_loss, event, event.step)
            if event.val_loss is not None:
                self._curve["val"].append((event.step, event.val_loss))
        elif isinstance(event, ev.Status):
            self._client.set_tag(self.run_id, "training_status", event.state)
        elif event.terminal:
            self._finish(event)

    def _log_request(self) -> None:
        """The request (the canvas JSON) as the artifact ``structure.json``."""
        with tempfile.TemporaryDirectory(prefix="slmb-mlflow-") as tmp:
            structure = Path(tmp) / STRUCTURE
            structure.write_text(json.dumps(self.request, indent=2))
            self._client.log_artifact(self.run_id, str(structure))

    def _finish(self, event: ev.Event) -> None:
        self._flush()
        state = event.name
        self._log_request()  # again: the one logged at the start may have failed, or be a resumed run's
        with tempfile.TemporaryDirectory(prefix="slmb-mlflow-") as tmp:
            if self._curve["train"] or self._curve["val"]:
                curve = Path(tmp) / "loss_curve.png"
                plot_loss_curve(self._curve, curve)
                self._client.log_artifact(self.run_id, str(curve))
        if isinstance(event, ev.Finished) and (Path(event.path) / WEIGHTS).is_file():
            # Weights and metadata make the run a complete copy of the model: see fetch_model.
            for name in (WEIGHTS, METADATA):
                if (Path(event.path) / name).is_file():
                    self._client.log_artifact(self.run_id, str(Path(event.path) / name))
        self._client.set_tag(self.run_id, "training_status", state)
        self._client.set_terminated(self.run_id, _FINAL_STATUS[state])


def end_run(task_id: str, state: str, mlflow_client: Any = None) -> bool:
    """Close the MLflow run of a task that ended without its trainer closing it (cancelled while queued, its
    process killed, tracking down at its end): ``training_status`` = ``state`` (finished, stopped or error), run
    status FINISHED, KILLED or FAILED. A task without a run, or whose run has already ended, is left alone.
    Returns whether a run was closed."""
    check_task_id(task_id)
    mlflow_client = mlflow_client or client()
    experiment = mlflow_client.get_experiment_by_name(experiment_name())
    runs = [] if experiment is None else mlflow_client.search_runs(
        [experiment.experiment_id], f"tags.task_id = '{task_id}'", max_results=1)
    if not runs or runs[0].info.status != "RUNNING":
        return False
    mlflow_client.set_tag(runs[0].info.run_id, "training_status", state)
    mlflow_client.set_terminated(runs[0].info.run_id, _FINAL_STATUS[state])
    return True


def finished_model_runs(mlflow_client: Any = None) -> dict[str, Any]:
    """The newest finished run of every model name in the experiment, ``{model_name: mlflow Run}``."""
    mlflow_client = mlflow_client or client()
    experiment = mlflow_client.get_experiment_by_name(experiment_name())
    if experiment is None:
        return {}
    runs = mlflow_client.search_runs([experiment.experiment_id], "tags.training_status = 'finished'",
                                     order_by=["attributes.end_time DESC"], max_results=1000)
    newest: dict[str, Any] = {}
    for run in runs:
        name = run.data.tags.get("model_name", "")
        if MODEL_NAME_RE.match(name) and name not in newest:
            newest[name] = run
    return newest


def fetch_model(name: str, mlflow_client: Any = None) -> Path:
    """Copy the newest finished model ``name`` from MLflow into the local store and return ``completed/<name>``.

    A service whose workers train on other machines (other ``SLMB_HOME``s, one tracking store) serves their
    models this way. Raises :class:`StoreError` when MLflow has no finished run of that name with weights.
    """
    check_model_name(name)
    mlflow_client = mlflow_client or client()
    experiment = mlflow_client.get_experiment_by_name(experiment_name())
    runs = [] if experiment is None else mlflow_client.search_runs(
        [experiment.experiment_id], f"tags.model_name = '{name}' and tags.training_status = 'finished'",
        order_by=["attributes.end_time DESC"], max_results=1)
    if not runs:
        raise StoreError(f"no completed model named {name!r} in the store or in MLflow")
    run = runs[0]
    with tempfile.TemporaryDirectory(prefix="slmb-fetch-") as tmp:
        files = {f.path for f in mlflow_client.list_artifacts(run.info.run_id)}
        if WEIGHTS not in files or STRUCTURE not in files:
            raise StoreError(f"MLflow run {run.info.run_id} of {name!r} has no {WEIGHTS} or {STRUCTURE}")
        for f in (WEIGHTS, STRUCTURE, METADATA):
            if f in files:
                mlflow_client.download_artifacts(run.info.run_id, f, tmp)
        if METADATA not in files:
            write_json(Path(tmp) / METADATA, {})
        try:  # the checks a local model gets: a broken copy is refused before it enters the store
            request, weights, metadata = read_model(Path(tmp), name)
        except BrokenModelError as exc:
            raise BrokenModelError(name, exc.reason, run.info.run_id) from None
        metadata.update(source="mlflow", mlflow_run_id=run.info.run_id,
                        mlflow_experiment_id=run.info.experiment_id, mlflow_tracking_uri=tracking_uri())
        for key in ("model_name", "created", "slmb_version", "store_version", "weight_aliases"):
            metadata.pop(key, None)  # save_completed records these afresh
        return save_completed(name, request, weights, metadata)


def plot_loss_curve(curve: Mapping[str, list[tuple[int, float]]], path: Path) -> None:
    """Training and validation loss against step, as a PNG (matplotlib's Agg canvas: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, points in curve.items():
        if points:
            steps, losses = zip(*points, strict=True)
            ax.plot(steps, losses, label=f"{label} loss", marker="o" if label == "val" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
