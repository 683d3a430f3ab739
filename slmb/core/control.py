"""Stop flags, run status and the trainer's process, kept in the run directory (DESIGN.md §4).

A stop is cooperative by default: ``request_stop`` leaves a flag that the trainer checks every step; it then
checkpoints and ends its event log with ``stopped``. ``force=True`` also kills the training process
(SIGTERM, then SIGKILL after a grace period) and, because a killed process writes nothing more, appends
``stop_forced`` and ``stopped`` to the event log itself, so every log ends with a terminal event.

:class:`FileControl` works on one machine with nothing but files. The service can put a Redis-backed class
with the same methods behind :func:`get_control`.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, Literal, Protocol

from slmb.core import events as ev
from slmb.core.store import (
    Run,
    StoreError,
    checkpoint_step,
    latest_checkpoint,
    read_json,
    remove_tree,
    run_dir,
    slmb_home,
    write_json,
)

State = Literal["queued", "running", "stopped", "finished", "error"]
DONE_STATES = ("stopped", "finished", "error")
RESUMABLE_STATES = ("stopped", "error", "lost")  # with a checkpoint: `slmb train --resume` continues them


class Control(Protocol):
    def request_stop(self, task_id: str, force: bool = False) -> dict[str, Any]: ...

    def stop_requested(self, task_id: str) -> bool: ...

    def clear_stop(self, task_id: str) -> None: ...

    def write_status(self, task_id: str, state: State, **info: Any) -> None: ...

    def read_status(self, task_id: str) -> dict[str, Any] | None: ...

    def register_process(self, task_id: str, pid: int | None = None) -> None: ...


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (Linux), or None without /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks, to tell a live trainer from a recycled pid."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def _alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc (macOS): the pid answering is all we can know
    if fields[0] == "Z":  # a zombie has exited; only its parent has not reaped it yet
        return False
    return start_time is None or fields[19] == start_time


class FileControl:
    """Stop flags, status and pid as files in ``runs/<task_id>/``."""

    def __init__(self, grace_s: float = 5.0):
        self.grace_s = grace_s
        self._flags: dict[str, Path] = {}

    def _flag(self, task_id: str) -> Path:
        # Cached: the trainer asks every step, so the check is one stat() call.
        if task_id not in self._flags:
            self._flags[task_id] = run_dir(task_id).path / "stop"
        return self._flags[task_id]

    def stop_requested(self, task_id: str) -> bool:
        return os.path.exists(self._flag(task_id))

    def clear_stop(self, task_id: str) -> None:
        self._flag(task_id).unlink(missing_ok=True)

    def write_status(self, task_id: str, state: State, **info: Any) -> None:
        run = run_dir(task_id)
        run.path.mkdir(parents=True, exist_ok=True)
        status = {**(self.read_status(task_id) or {}), **info, "task_id": task_id, "state": state,
                  "updated": time.time()}
        write_json(run.status, status)

    def read_status(self, task_id: str) -> dict[str, Any] | None:
        try:
            return read_json(run_dir(task_id).status)
        except FileNotFoundError:
            return None

    def register_process(self, task_id: str, pid: int | None = None) -> None:
        pid = os.getpid() if pid is None else pid
        write_json(run_dir(task_id).pid, {"pid": pid, "start_time": _start_time(pid), "host": socket.gethostname()})

    def request_stop(self, task_id: str, force: bool = False) -> dict[str, Any]:
        """Ask a run to stop; with ``force``, kill its process. Returns ``{task_id, mode, state, message}``."""
        run = run_dir(task_id)
        if not run.exists():
            raise StoreError(f"no run {task_id!r} in {run.path.parent}")
        service = service_of(run)
        if service is not None:  # a stop flag here would reach no worker
            raise StoreError(f"run {task_id} is a task of the HTTP service: stop it there (set SLMB_REDIS_URL to "
                             f"its Redis, {service.get('redis_url')}, or POST /api/v1/stop-training)")
        mode = "force_kill" if force else "cooperative_stop"
        state = (self.read_status(task_id) or {}).get("state", "queued")
        if state in DONE_STATES:
            return {"task_id": task_id, "mode": mode, "state": state, "message": f"the run has already {state}"}
        write_json(self._flag(task_id), {"force": force, "ts": time.time()})
        if not force:
            return {"task_id": task_id, "mode": mode, "state": state,
                    "message": "stop requested; the trainer checkpoints and stops at its next step"}
        try:
            proc = read_json(run.pid)
        except FileNotFoundError:
            return {"task_id": task_id, "mode": mode, "state": state,
                    "message": "no training process has started; it will stop as soon as it starts"}
        if proc.get("host") != socket.gethostname():
            raise StoreError(f"run {task_id} trains on host {proc.get('host')!r}; stop it from there")
        message = self._kill(proc["pid"], proc.get("start_time"))
        self._close_log(task_id, proc["pid"], message)
        return {"task_id": task_id, "mode": mode, "state": "stopped", "message": message}

    def _kill(self, pid: int, start_time: str | None) -> str:
        if not _alive(pid, start_time):
            return f"the training process {pid} had already exited"
        for sig, wait_s in ((signal.SIGTERM, self.grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while _alive(pid, start_time) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _alive(pid, start_time):
                return f"killed the training process {pid} ({sig.name})"
        if _alive(pid, start_time):
            raise StoreError(f"the training process {pid} survived SIGKILL")
        return f"the training process {pid} exited"

    def _close_log(self, task_id: str, pid: int, message: str) -> None:
        """A killed trainer wrote no ``stopped``: append it, with the last step and checkpoint it reached.

        The checkpoint is the newest whole one on disk, not the log's last ``checkpoint`` event: the trainer
        publishes step N+1, deletes step N and only then logs N+1, so a kill in between leaves a log whose last
        checkpoint is gone while N+1 is there to resume from."""
        run = run_dir(task_id)
        history = ev.read_events(run.events)
        if any(e.terminal for e in history):
            return
        step = next((e.step for e in reversed(history) if isinstance(e, (ev.Step, ev.Progress, ev.Checkpoint))),
                    None)
        latest = latest_checkpoint(run)
        ckpt = str(latest) if latest else None
        if latest is not None:
            step = max(step or 0, checkpoint_step(latest))
        sink = ev.JsonlSink(run.events)
        try:
            sink.emit(ev.StopForced(task_id=task_id, pid=pid, message=message))
            sink.emit(ev.Status(task_id=task_id, state="stopped", message=message))
            sink.emit(ev.Stopped(task_id=task_id, step=step, checkpoint=ckpt, reason="force"))
        finally:
            sink.close()
        self.write_status(task_id, "stopped", step=step, checkpoint=ckpt)


def service_of(run: Run) -> dict[str, Any] | None:
    """``{"redis_url", "queue"}`` when the run is a task of the HTTP service, else None."""
    try:
        service = read_json(run.service)
    except (OSError, ValueError):
        return None
    return service if isinstance(service, dict) else None


def list_runs() -> list[dict[str, Any]]:
    """The training runs in this SLMB_HOME, oldest first: task id, model name, state, last step, times.

    A run whose status says "running" but whose process is gone (killed with the machine, say) is "lost".
    A task of the HTTP service (``service`` set) keeps its state in the service's Redis, which this module does not
    read: its state is the one its event log ended with (a worker sharing this SLMB_HOME writes the log here), else
    "unknown", never a "queued" it may long have left (the CLI then asks that Redis)."""
    root = slmb_home() / "runs"
    control, runs = FileControl(), []
    for path in root.iterdir() if root.is_dir() else []:
        try:
            run = run_dir(path.name)
            request = read_json(run.request)
        except (StoreError, OSError, ValueError):
            continue  # not a run directory, or one whose request is unreadable
        status = control.read_status(run.task_id) or {}
        service = service_of(run)
        if service is not None and not status:
            status = _service_status(run, service)
        state = status.get("state", "queued")
        if state == "running":
            try:
                proc = read_json(run.pid)
                if proc.get("host") == socket.gethostname() and not _alive(proc["pid"], proc.get("start_time")):
                    state = "lost"
            except (OSError, ValueError, KeyError):
                pass
        step = status.get("step")
        if state in ("running", "lost"):  # the status holds the step of its last write; the log is fresher
            step = next((e.step for e in reversed(ev.read_events(run.events))
                         if isinstance(e, (ev.Step, ev.Progress))), step)
        body = request if isinstance(request, dict) else {}
        # Only a whole checkpoint on disk makes a run resumable: a second Ctrl-C, or a kill before the first
        # checkpoint, leaves a stopped run with nothing to continue from.
        ckpt = latest_checkpoint(run) if state in RESUMABLE_STATES and service is None else None
        runs.append({"task_id": run.task_id, "model_name": body.get("modelName") or body.get("model_name"),
                     "state": state, "step": step, "created": run.request.stat().st_mtime,
                     "updated": status.get("updated"), "message": status.get("message"), "service": service,
                     "checkpoint": str(ckpt) if ckpt else None, "resumable": ckpt is not None})
    return sorted(runs, key=lambda r: r["created"])


def _service_status(run: Run, service: dict[str, Any]) -> dict[str, Any]:
    """What this machine's files tell of a service task: the terminal event of its log if it has one."""
    history = ev.read_events(run.events)
    ended = next((e for e in reversed(history) if e.terminal), None)
    step = next((e.step for e in reversed(history) if isinstance(e, (ev.Step, ev.Progress, ev.Stopped, ev.Finished))
                 and e.step is not None), None)
    if ended is not None:
        return {"state": ended.name, "step": step, "updated": ended.ts,
                "message": getattr(ended, "message", None)}
    return {"state": "unknown", "step": step,
            "message": f"a task of the HTTP service: its state is in the service's Redis "
                       f"({service.get('redis_url')}); set SLMB_REDIS_URL to see it"}


def get_control() -> Control:
    """The control backend in use: files in the run directory."""
    return FileControl()


def find_run(task_id: str) -> dict[str, Any]:
    """The :func:`list_runs` entry of one run; a :class:`StoreError` when there is no such run."""
    run = run_dir(task_id)
    if not run.exists():
        raise StoreError(f"no run {task_id!r} in {run.path.parent}")
    found = next((r for r in list_runs() if r["task_id"] == task_id), None)
    if found is None:
        raise StoreError(f"run {task_id} has no readable request.json in {run.path}")
    return found


def resume_problem(task_id: str) -> str | None:
    """Why the run ``task_id`` cannot be resumed, or None when it can (it stopped, failed or was lost, and has a
    whole checkpoint)."""
    try:
        info = find_run(task_id)
    except StoreError as exc:
        return str(exc)
    state = info["state"]
    if info["service"] is not None:
        return (f"run {task_id} is a task of the HTTP service ({(info['service'] or {}).get('redis_url')}): this "
                "machine does not hold its checkpoints")
    if state == "finished":
        return f"run {task_id} has finished; there is nothing to resume"
    if state in ("running", "queued"):
        return f"run {task_id} is still {state}"
    if not info["resumable"]:
        why = ("it was stopped before saving one (a second Ctrl-C quits without saving)" if state == "stopped"
               else "it ended before saving one")
        return f"run {task_id} ({state}) has no checkpoint to resume from: {why}"
    return None


def remove_run(task_id: str) -> dict[str, Any]:
    """Remove a run's directory (events, checkpoints, request) from ``$SLMB_HOME/runs``; refuses one that is still
    queued or running (stop it first), or a task of the HTTP service whose state this machine cannot tell.
    Returns the run's :func:`list_runs` entry."""
    info = find_run(task_id)
    if info["state"] in ("running", "queued", "unknown"):
        why = ("its state is in the HTTP service's Redis" if info["state"] == "unknown"
               else f"it is {info['state']}: stop it first (slmb stop {task_id})")
        raise StoreError(f"run {task_id} cannot be removed: {why}")
    remove_tree(run_dir(task_id).path)
    return info


PRUNABLE = ("error", "lost")


def prune_candidates(older_than_s: float | None = None, now: float | None = None) -> list[dict[str, Any]]:
    """The runs ``slmb prune`` removes: failed (error), lost (their process died while running) and stopped
    without a checkpoint, last updated more than ``older_than_s`` seconds ago when given. Finished runs, runs
    that can be resumed, running ones and the HTTP service's tasks stay."""
    now = time.time() if now is None else now
    chosen = []
    for info in list_runs():
        if info["service"] is not None:
            continue
        if not (info["state"] in PRUNABLE or (info["state"] == "stopped" and not info["resumable"])):
            continue
        when = info["updated"] or info["created"]
        if older_than_s is not None and now - when < older_than_s:
            continue
        chosen.append(info)
    return chosen
