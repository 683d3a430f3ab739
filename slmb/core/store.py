"""Where slmb keeps things (DESIGN.md §4): ``$SLMB_HOME`` (default ``./.slmb``).

```
$SLMB_HOME/
  runs/<task_id>/           events.jsonl, status.json, request.json, pid.json, checkpoints/,
                            service.json (a task of the HTTP service: the Redis that holds its state)
  completed/<name>          -> .versions/<name>/<version>   (a relative symlink)
  completed/.versions/<name>/<version>/   model.safetensors, structure.json, metadata.json
  mlflow.db                 the default MLflow tracking store
```

Weights are safetensors and everything else JSON: nothing here ever unpickles a file.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
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


class BrokenModelError(StoreError):
    """A model whose files cannot be used. ``reason`` names files relative to the model (``model.safetensors``),
    never by a server path, so that HTTP answers can carry it. ``mlflow_run_id``: the broken copy is MLflow's."""

    def __init__(self, name: str, reason: str, mlflow_run_id: str | None = None):
        self.name, self.reason, self.mlflow_run_id = name, reason, mlflow_run_id
        where = f" (the copy in MLflow run {mlflow_run_id})" if mlflow_run_id else ""
        super().__init__(f"model {name!r} is broken{where}: {reason}")


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

    @property
    def service(self) -> Path:
        """``{"redis_url", "queue"}`` of the HTTP service whose task this is: its state lives in that Redis."""
        return self.path / "service.json"

    def exists(self) -> bool:
        return self.path.is_dir()


def latest_checkpoint(run: Run) -> Path | None:
    """The run's newest whole checkpoint (``checkpoints/step-N/`` with its ``trainer.json``): the one a resume
    continues from. A save cut short is a ``.tmp-`` directory or lacks ``trainer.json``, and is never it."""
    found = sorted(p for p in run.checkpoints.glob("step-*") if (p / "trainer.json").is_file())
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def new_task_id() -> str:
    return str(uuid.uuid4())


def run_dir(task_id: str) -> Run:
    return Run(check_task_id(task_id), slmb_home() / "runs" / task_id)


def create_run(request: Mapping[str, Any], task_id: str | None = None, service: Mapping[str, Any] | None = None
               ) -> Run:
    """Make ``runs/<task_id>/`` (a new id unless given) holding the request as sent; ``service`` marks a task of
    the HTTP service, which a worker runs elsewhere (see :attr:`Run.service`)."""
    run = run_dir(task_id or new_task_id())
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    write_json(run.request, dict(request))
    if service is not None:
        write_json(run.service, dict(service))
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
                   metadata: Mapping[str, Any], extra_files: Mapping[str, Path] | None = None) -> Path:
    """Publish a finished model as ``completed/<name>``, replacing an older one only once this one is whole.

    ``request`` is the request JSON as sent; ``metadata`` is recorded in ``metadata.json`` together with
    the name, creation time, slmb version and tied-weight aliases. ``extra_files`` (file name -> source path)
    are copied into the model's directory: an imported checkpoint's tokenizer files. Returns ``completed/<name>``.
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
        for file_name, src in (extra_files or {}).items():
            if Path(file_name).name != file_name or file_name in (WEIGHTS, STRUCTURE, METADATA):
                raise StoreError(f"{file_name!r} cannot be stored beside a model's own files")
            shutil.copyfile(src, vdir / file_name)
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
    """A model in the store. ``error`` says why it cannot be used (its files are damaged); None when they look whole.
    ``stamp`` identifies the files' contents (inode, size, mtime of each), so a cache can tell they changed."""

    name: str
    path: Path
    metadata: dict[str, Any]
    error: str | None = None
    stamp: tuple = ()

    @property
    def structure_file(self) -> Path:
        return self.path / STRUCTURE

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS

    def to_dict(self) -> dict[str, Any]:
        out = {**self.metadata, "model_name": self.name, "path": str(self.path),
               "structure_file": str(self.structure_file), "has_structure": self.structure_file.is_file(),
               "status": "broken" if self.error else "ok"}
        if self.error:
            out["error"] = self.error
        return out


# safetensors dtypes and their sizes in bytes: what a header may name.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def _check_weights(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file, judged from its header and size without reading tensor data
    (what safetensors itself checks before loading); None when it is whole."""
    size = path.stat().st_size
    if size == 0:
        return f"{WEIGHTS} is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{WEIGHTS} is truncated: {size} bytes, less than a safetensors header"
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return (f"{WEIGHTS} is truncated or not a safetensors file: its header needs {8 + n:,} bytes, "
                    f"the file holds {size:,}")
        if n > _MAX_HEADER_BYTES:
            return f"{WEIGHTS} is not a safetensors file: a header of {n:,} bytes"
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        return f"{WEIGHTS} is not a safetensors file: its header is not JSON"
    if not isinstance(header, dict):
        return f"{WEIGHTS} is not a safetensors file: its header is not a JSON object"
    meta = header.pop("__metadata__", None) or {}
    spans = []
    for name, info in header.items():
        info = info if isinstance(info, dict) else {}
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if (dtype not in _DTYPE_BYTES or not isinstance(shape, list) or not isinstance(offsets, list)
                or len(offsets) != 2 or not all(type(v) is int and v >= 0 for v in [*shape, *offsets])
                or offsets[0] > offsets[1]):
            return f"{WEIGHTS} has a malformed header entry for tensor {name!r}"
        nbytes = _DTYPE_BYTES[dtype] * math.prod(shape)
        if offsets[1] - offsets[0] != nbytes:
            return (f"{WEIGHTS}: tensor {name!r} ({dtype} {shape}) needs {nbytes:,} bytes, its data holds "
                    f"{offsets[1] - offsets[0]:,}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            return f"{WEIGHTS}: the data of tensor {name!r} does not follow the tensor before it"
        end = stop
    data = size - 8 - n
    if end > data:
        return f"{WEIGHTS} is truncated: its header lists {end:,} bytes of tensor data, the file holds {data:,}"
    if end < data:
        return f"{WEIGHTS} has {data - end:,} bytes past its tensor data"
    try:
        aliases = json.loads(meta.get("slmb.aliases", "{}")) if isinstance(meta, dict) else None
    except (TypeError, ValueError):
        aliases = None
    if not isinstance(aliases, dict) or not all(kept in header for kept in aliases.values()):
        return f"{WEIGHTS} has malformed tied-weight aliases in its metadata"
    return None


def _json_problem(path: Path) -> tuple[Any, str | None]:
    """(the parsed file, None) or (None, why it cannot be read)."""
    try:
        return read_json(path), None
    except (ValueError, RecursionError) as exc:
        return None, f"{path.name} is not valid JSON: {exc}"


def check_model_files(path: Path) -> tuple[dict[str, Any], str | None]:
    """(metadata, why the model in ``path`` cannot be used or None): every file present, the weights' header
    consistent with the file's length, structure.json a valid request, metadata.json a JSON object. Reads no
    tensor data, so listing many models stays fast; loading checks the rest."""
    from pydantic import ValidationError

    from slmb.core.spec import TrainRequest

    if not path.is_dir():
        return {}, "the model's directory is missing"
    missing = [f for f in (WEIGHTS, STRUCTURE, METADATA) if not (path / f).is_file()]
    if missing:
        return {}, f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
    metadata, problem = _json_problem(path / METADATA)
    if problem is None and not isinstance(metadata, dict):
        problem = f"{METADATA} is not a JSON object"
    elif problem is None and not isinstance(metadata.get("tokenizer", ""), str):
        problem = f"{METADATA}: tokenizer is not a string"
    metadata = metadata if problem is None else {}
    problem = problem or _check_weights(path / WEIGHTS)
    if problem:
        return metadata, problem
    request, problem = _json_problem(path / STRUCTURE)
    if problem:
        return metadata, problem
    try:
        TrainRequest.model_validate(request)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        where = "".join(f"/{p}" for p in first["loc"]) or "/"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return metadata, f"{STRUCTURE} is not a valid request: {where}: {first['msg']}{more}"
    return metadata, None


def _stamp(path: Path) -> tuple:
    try:
        return (str(path.resolve()), *((s.st_ino, s.st_size, s.st_mtime_ns)
                                       for s in (os.stat(path / f) for f in (WEIGHTS, STRUCTURE, METADATA))))
    except OSError:
        return ()


def _entry(name: str) -> ModelEntry:
    path = _completed_root() / name
    try:
        metadata, error = check_model_files(path)
    except OSError as exc:  # unreadable (permissions), or removed while we looked
        metadata, error = {}, f"its files cannot be read: {exc.strerror}"
    return ModelEntry(name, path, metadata, error, _stamp(path))


def list_models() -> list[ModelEntry]:
    """The models in the store, sorted by name, broken ones included (with ``error`` set). Partial saves and
    stray files are never listed."""
    root = _completed_root()
    if not root.is_dir():
        return []
    names = sorted(p.name for p in root.iterdir()
                   if MODEL_NAME_RE.match(p.name) and (p.is_symlink() or p.is_dir()))
    return [_entry(name) for name in names]


def get_model(name: str) -> ModelEntry:
    """The model ``name``, broken or not (see ``error``); a :class:`StoreError` when there is none."""
    path = _completed_root() / check_model_name(name)
    if not (path.is_symlink() or path.is_dir()):
        known = ", ".join(e.name for e in list_models()) or "none"
        raise StoreError(f"no completed model named {name!r} in {_completed_root()} (known: {known})")
    return _entry(name)


def read_model(path: Path, name: str, device: str | torch.device = "cpu"
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(request JSON as sent, state dict, metadata) of the model files in ``path``, checked in full (every tensor
    loads). Raises :class:`BrokenModelError` saying why they cannot be used."""
    metadata, problem = check_model_files(path)
    if problem:
        raise BrokenModelError(name, problem)
    try:
        weights = load_weights(path / WEIGHTS, device)
    except Exception as exc:  # safetensors' own errors: whatever the header check could not see
        raise BrokenModelError(name, f"{WEIGHTS} cannot be loaded: {str(exc).replace(str(path), '')}") from None
    return read_json(path / STRUCTURE), weights, metadata


def load_completed(name: str, device: str | torch.device = "cpu"
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(request JSON as sent, state dict, metadata) of a completed model; :class:`BrokenModelError` if its files
    cannot be used."""
    entry = get_model(name)
    if entry.error:
        raise BrokenModelError(name, entry.error)
    # Every file from one version, even if a new one is published meanwhile.
    return read_model(entry.path.resolve(), name, device)


# ---------------------------------------------------------------------------------------------------- removal


def tree_size(path: Path) -> int:
    """Bytes of the files under ``path`` (links not followed); 0 when it is gone."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _inside_home(path: Path) -> Path:
    """``path`` (not followed if it is a link) when it lies strictly inside ``$SLMB_HOME``, else a StoreError."""
    home = slmb_home().resolve()
    where = path.parent.resolve() / path.name
    if where == home or not where.is_relative_to(home):
        raise StoreError(f"{path} is not inside $SLMB_HOME ({home}): slmb removes nothing outside it")
    return where


def remove_tree(path: Path) -> None:
    """Remove a run or model directory (or link) inside ``$SLMB_HOME``, atomically as far as readers see: it is
    first renamed into ``$SLMB_HOME/.trash/`` (one rename(2) on the same file system: it is there, whole, or gone),
    then deleted. A link is removed, never followed. Leftovers of an earlier removal that was cut short go too."""
    where = _inside_home(path)
    if not (where.exists() or where.is_symlink()):
        return
    trash = slmb_home().resolve() / ".trash"
    trash.mkdir(exist_ok=True)
    doomed = trash / f"{where.name}.{uuid.uuid4().hex[:8]}"
    os.replace(where, doomed)
    _fsync_path(where.parent)
    for item in trash.iterdir():
        if item.is_symlink() or not item.is_dir():
            item.unlink(missing_ok=True)
        else:
            shutil.rmtree(item, ignore_errors=True)


def remove_model(name: str) -> Path:
    """Remove the completed model ``name`` (its link and every version) from the store; returns where it was. Other
    copies (an MLflow run's artifacts) stay."""
    link = _completed_root() / check_model_name(name)
    if not (link.is_symlink() or link.is_dir()):
        known = ", ".join(e.name for e in list_models()) or "none"
        raise StoreError(f"no completed model named {name!r} in {_completed_root()} (known: {known})")
    with _name_lock(name) as versions:  # no save of this name is half-way
        remove_tree(link)  # the name disappears in one rename; then its versions
        remove_tree(versions)
    (versions.parent / f"{name}.lock").unlink(missing_ok=True)
    return link
