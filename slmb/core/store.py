"""Where slmb keeps things (DESIGN.md §4): ``$SLMB_HOME`` (default ``./.slmb``).

```
$SLMB_HOME/
  runs/<task_id>/           events.jsonl, status.json, request.json, pid.json, checkpoints/
  completed/<name>          -> .versions/<name>/<version>   (a relative symlink)
  completed/.versions/<name>/<version>/   model.safetensors, structure.json, metadata.json
  mlflow.db                 the default MLflow tracking store
```

Weights are safetensors and everything else JSON: nothing here ever unpickles a file.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmb import __version__
from slmb.core.spec import MODEL_NAME_RE

if TYPE_CHECKING:  # torch is imported where tensors are handled: `slmb stop`, `list` and `events` stay fast
    import torch

WEIGHTS, STRUCTURE, METADATA = "model.safetensors", "structure.json", "metadata.json"
# Test hook: seconds to sleep after the weights are written and before the model is published, so a test
# can kill the saver mid-save. Unset in normal use.
SAVE_PAUSE_ENV = "SLMB_TEST_SAVE_PAUSE_S"


class StoreError(ValueError):
    """A bad model name or task id, or a model that is not in the store."""


def slmb_home() -> Path:
    return Path(os.environ.get("SLMB_HOME") or ".slmb").expanduser().absolute()


def check_model_name(name: str) -> str:
    """The name unchanged, or a :class:`StoreError`. The rule admits no ``/``, no leading ``.``, no ``..``."""
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise StoreError(f"invalid model name {name!r}: it must match {MODEL_NAME_RE.pattern} "
                         "(letters, digits, '.', '_', '-'; it names files)")
    return name


def check_task_id(task_id: str) -> str:
    if not isinstance(task_id, str) or not MODEL_NAME_RE.match(task_id):
        raise StoreError(f"invalid task id {task_id!r}")
    return task_id


# ---------------------------------------------------------------------------------------------------- files


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_weights(path: Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                 ) -> dict[str, str]:
    """Save tensors as safetensors, fsynced. Returns the aliases ``{name: kept name}`` it deduplicated.

    safetensors refuses tensors that share memory, and a tied model has two names for one tensor (the
    token embedding is the LM head). One copy is saved and the alias is recorded in the file's header;
    :func:`load_weights` gives the alias back as the same tensor, so ``load_state_dict`` restores both.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in state_dict.items():
        t = t.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        ptr = t.untyped_storage().data_ptr()
        # A different view of memory another tensor also uses: save its own copy.
        t = t.clone() if ptr in storages else t
        storages.add(ptr)
        tensors[name] = t.contiguous().cpu()
    header = dict(metadata or {})
    if aliases:
        header["slmb.aliases"] = json.dumps(aliases)
    save_file(tensors, str(path), metadata=header)
    _fsync_path(path)
    return aliases


def load_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file (no pickle), restoring tied names as the same tensor."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
        header = f.metadata() or {}
    for alias, kept in json.loads(header.get("slmb.aliases", "{}")).items():
        tensors[alias] = tensors[kept]
    return tensors


# ---------------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Run:
    """A run directory, ``runs/<task_id>/``."""

    task_id: str
    path: Path

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def status(self) -> Path:
        return self.path / "status.json"

    @property
    def request(self) -> Path:
        return self.path / "request.json"

    @property
    def pid(self) -> Path:
        return self.path / "pid.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def exists(self) -> bool:
        return self.path.is_dir()


def new_task_id() -> str:
    return str(uuid.uuid4())


def run_dir(task_id: str) -> Run:
    return Run(check_task_id(task_id), slmb_home() / "runs" / task_id)


def create_run(request: Mapping[str, Any], task_id: str | None = None) -> Run:
    """Make ``runs/<task_id>/`` (a new id unless given) holding the request as sent."""
    run = run_dir(task_id or new_task_id())
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    write_json(run.request, dict(request))
    return run


# ---------------------------------------------------------------------------------------------------- completed

# Crash safety of the completed store. ``completed/<name>`` is a symlink to a version directory. A save
# builds a new version directory next to the others, fsyncs every file and the directory, and only then
# points the name at it by renaming a fresh symlink over the old one. rename(2) is atomic, so at every
# instant the name resolves to the previous complete version or to the new complete one; a crash before
# the rename leaves an unreferenced directory that no listing sees and the next save of that name deletes.
# Saves of one name are serialised with a lock file, so that clean-up never removes a version another
# process is still writing.


def _completed_root() -> Path:
    return slmb_home() / "completed"


@contextmanager
def _name_lock(name: str) -> Iterator[Path]:
    versions = _completed_root() / ".versions" / name
    versions.mkdir(parents=True, exist_ok=True)
    with open(versions.parent / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield versions
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def save_completed(name: str, request: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                   metadata: Mapping[str, Any]) -> Path:
    """Publish a finished model as ``completed/<name>``, replacing an older one only once this one is whole.

    ``request`` is the request JSON as sent; ``metadata`` is recorded in ``metadata.json`` together with
    the name, creation time, slmb version and tied-weight aliases. Returns ``completed/<name>``.
    """
    check_model_name(name)
    link = _completed_root() / name
    with _name_lock(name) as versions:
        version = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        vdir = versions / version
        vdir.mkdir()
        aliases = save_weights(vdir / WEIGHTS, state_dict, {"model_name": name})
        if os.environ.get(SAVE_PAUSE_ENV):
            print(f"slmb: save of {name} paused (test hook)", file=sys.stderr, flush=True)
            time.sleep(float(os.environ[SAVE_PAUSE_ENV]))
        write_json(vdir / STRUCTURE, dict(request))
        meta = {**metadata, "model_name": name, "created": datetime.now(timezone.utc).isoformat(),
                "slmb_version": __version__, "store_version": version, "weight_aliases": aliases}
        write_json(vdir / METADATA, meta)
        _fsync_path(vdir)
        _fsync_path(versions)

        tmp_link = versions / f"link.{uuid.uuid4().hex[:8]}.tmp"
        os.symlink(os.path.relpath(vdir, link.parent), tmp_link)
        if link.is_dir() and not link.is_symlink():
            raise StoreError(f"{link} is a directory slmb did not write; move it away to save {name!r}")
        os.replace(tmp_link, link)
        _fsync_path(link.parent)

        for stale in versions.iterdir():
            if stale == vdir:
                continue
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
    return link


@dataclass(frozen=True)
class ModelEntry:
    """A complete model in the store."""

    name: str
    path: Path
    metadata: dict[str, Any]

    @property
    def structure_file(self) -> Path:
        return self.path / STRUCTURE

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS

    def to_dict(self) -> dict[str, Any]:
        return {**self.metadata, "model_name": self.name, "path": str(self.path),
                "structure_file": str(self.structure_file), "has_structure": self.structure_file.is_file()}


def _entry(name: str) -> ModelEntry | None:
    path = _completed_root() / name
    if not all((path / f).is_file() for f in (WEIGHTS, STRUCTURE, METADATA)):
        return None
    try:
        metadata = read_json(path / METADATA)
    except (OSError, ValueError):
        return None
    return ModelEntry(name, path, metadata)


def list_models() -> list[ModelEntry]:
    """The complete models, sorted by name. Partial saves and stray files are never listed."""
    root = _completed_root()
    if not root.is_dir():
        return []
    names = sorted(p.name for p in root.iterdir() if MODEL_NAME_RE.match(p.name))
    return [e for e in map(_entry, names) if e is not None]


def get_model(name: str) -> ModelEntry:
    entry = _entry(check_model_name(name))
    if entry is None:
        known = ", ".join(e.name for e in list_models()) or "none"
        raise StoreError(f"no completed model named {name!r} in {_completed_root()} (known: {known})")
    return entry


def load_completed(name: str, device: str | torch.device = "cpu"
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(request JSON as sent, state dict, metadata) of a completed model."""
    entry = get_model(name)
    version = entry.path.resolve()  # read every file from one version even if a new one is published meanwhile
    return read_json(version / STRUCTURE), load_weights(version / WEIGHTS, device), read_json(version / METADATA)
