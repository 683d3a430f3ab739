"""The service's trust boundary (DESIGN.md §5): whoever reaches the HTTP API does not own the machine.

What an HTTP caller may name, and what the service may show them, is decided here and nowhere else:

- a dataset is a named one (``slmb.core.data.DATASET_NAMES``) or a relative path to a file or folder under the
  data root (``SLMB_DATA_DIR``, ``slmb serve --data-dir``); an absolute path, ``~``, ``..`` or a link leading out
  of the root is refused with one message, whether or not such a path exists. Without a data root, names only;
- a tokenizer is a name; its files come from the tokenizer search path;
- a model or task is a name that matches the store's rule;
- no absolute server path reaches a client: :func:`redact` puts placeholders (``$SLMB_HOME``, ``~``, ...) in place
  of the roots this process knows, in the events written to Redis and in the responses that could carry paths.

The worker trains an HTTP task with ``confined=True`` (see :mod:`slmb.api.worker`), so the same rules hold where
the files are opened. The CLI trusts its user and goes through none of this.
"""

from __future__ import annotations

import functools
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from slmb.core.spec import MODEL_NAME_RE
from slmb.core.validate import unencodable


def check_name(value: str) -> str:
    """Model names and task ids name files: the store's rule (no '/', no leading '.') or a ValueError (a 422)."""
    if not MODEL_NAME_RE.match(value):
        raise ValueError("must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def check_text(value: str) -> str:
    """A lone surrogate (``"\\ud800"`` in JSON) is no character: it cannot be tokenized, encoded or sent back."""
    if unencodable(value):
        raise ValueError("the text holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)")
    return value


def request_issues(request: Any, data_root: Path | None) -> list[Any]:
    """What a valid :class:`~slmb.core.spec.TrainRequest` names that an HTTP caller may not use, as validation
    issues (JSON pointers ``/dataset``, ``/config/tokenizer`` and ``/config/init_from``)."""
    from slmb.core.data import DATASET_NAMES, DatasetRefusedError, dataset_files, path_in_root, refused_dataset
    from slmb.core.tokenizers import KNOWN_VOCAB_SIZES, canonical_tokenizer_name
    from slmb.core.validate import Issue

    issues = []
    dataset = request.dataset
    if dataset.strip().strip("/") not in DATASET_NAMES:
        path = path_in_root(dataset, data_root) if data_root else None
        problem = None
        try:
            if path is not None and path.exists():
                dataset_files(path, data_root)  # a folder holding a link that leads out is refused too
        except DatasetRefusedError:
            path = None
        except ValueError as exc:  # DatasetError, DatasetNotFoundError: a bad file inside the root
            problem = str(exc).replace(str(data_root.resolve()), "$SLMB_DATA_DIR")
        if path is None:
            issues.append(Issue("/dataset", refused_dataset(data_root), check="trust", found=dataset[:80],
                                expected="a named dataset or a path under the data root",
                                hint="datasets outside the data root can be used with the slmb CLI"))
        elif not path.exists() or problem:
            issues.append(Issue("/dataset", problem or "no such file or folder under the data root", check="trust",
                                found=dataset[:80], hint="paths are relative to the data root"))
    tokenizer = request.config.tokenizer
    if tokenizer is not None and canonical_tokenizer_name(tokenizer) is None:
        issues.append(Issue("/config/tokenizer", "the service takes tokenizers by name, not files", check="trust",
                            expected=f"one of {', '.join(sorted(KNOWN_VOCAB_SIZES))}",
                            hint="tokenizer files are found on the server's tokenizer search path "
                                 "($SLMB_TOKENIZER_DIR/<name>/)"))
    init_from = request.config.init_from
    if init_from is not None:
        from slmb.core.spec import MODEL_NAME_RE

        if not MODEL_NAME_RE.match(init_from):
            issues.append(Issue("/config/init_from", "the service starts from completed models by name, not from "
                                "paths or Hugging Face ids", check="trust", found=init_from[:80],
                                expected="the name of a completed model (see GET /api/v1/models)",
                                hint="import a checkpoint with `slmb import SOURCE --name NAME` first"))
    return issues


# ---------------------------------------------------------------------------------------------------- redaction


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:  # the working directory was removed
        return "/"


def _roots() -> tuple[re.Pattern[str], dict[str, str]]:
    """A pattern matching every root this process knows, and each root's placeholder."""
    env = os.environ
    return _compile(*(env.get(k) for k in ("SLMB_HOME", "SLMB_DATA_DIR", "SLMB_TOKENIZER_DIR", "HOME",
                                             "MLFLOW_TRACKING_URI")), _cwd())


@functools.lru_cache(maxsize=16)
def _compile(*key: str | None) -> tuple[re.Pattern[str], dict[str, str]]:
    from slmb.core.store import slmb_home

    _, data_dir, tokenizer_dir, _, tracking, cwd = key
    named = [(slmb_home(), "$SLMB_HOME"), (Path.home(), "~"), (Path(tempfile.gettempdir()), "$TMPDIR"),
             (Path(cwd), "$CWD")]
    named += [(Path(d).expanduser(), name) for d, name in ((data_dir, "$SLMB_DATA_DIR"),
                                                           (tokenizer_dir, "$SLMB_TOKENIZER_DIR")) if d]
    store = urlsplit(tracking or "")
    if store.scheme in ("", "sqlite", "file") and store.path.startswith("/"):  # tracking errors name their store
        # sqlite:////abs/path parses to the path //abs/path: one leading slash, or the placeholder would eat one.
        named.append((Path("/" + store.path.lstrip("/")).parent, "$MLFLOW_STORE"))
    # Both spellings of a root reached through a link; the deepest first, so nested roots (a home inside a temp
    # dir inside the user's home) take the most specific name; a root matches only whole path parts.
    names: dict[str, str] = {}
    for path, name in named:
        for form in (str(path.absolute()), str(path.resolve())):
            if form != "/":
                names.setdefault(form.rstrip("/"), name)
    roots = sorted(names, key=len, reverse=True)
    return re.compile("|".join(f"{re.escape(root)}(?![\\w.-])" for root in roots)), names


def _map_strings(value: Any, fn: Any) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_map_strings(v, fn) for v in value]
    return value


def redact(value: Any) -> Any:
    """``value`` (a string, or JSON-like data) with every known root replaced by its placeholder:
    ``/srv/slmb-home/runs/x`` -> ``$SLMB_HOME/runs/x``."""
    pattern, names = _roots()
    return _map_strings(value, lambda text: pattern.sub(lambda m: names[m.group(0)], text))


def redact_event(event: Any) -> Any:
    """The event with :func:`redact` applied to its payload (events stored in Redis are read over HTTP)."""
    return type(event).model_validate(redact(event.model_dump()))


def printable(value: Any) -> Any:
    """JSON-like data that a JSON response can always carry: NaN and Infinity as strings, lone surrogates
    escaped (``\\ud800``). For echoing a caller's bad input back in a 422."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("-" if value < 0 else "") + "Infinity"
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable(v) for v in value]
    if isinstance(value, str) and unencodable(value):
        return value.encode("utf-8", "backslashreplace").decode()
    return value


def store_kind(uri: str) -> str:
    """A tracking or storage URI reduced to its kind (``sqlite``, ``file``, ``http``): its path is this machine's."""
    return urlsplit(uri).scheme or "file"


def _no_local_path(value: Any) -> Any:
    """A metadata value that names a place on this machine, after :func:`redact`: a file URI becomes its kind, an
    absolute path its last part (a dataset or tokenizer file a CLI user trained with, say)."""
    if not isinstance(value, str):
        return value
    if value.startswith(("sqlite:", "file:")):
        return store_kind(value)
    return Path(value).name if value.startswith("/") else value


def store_relative(items: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """``items`` redacted, with the paths under ``keys`` relative to the store (left out if outside it), and any
    other top-level value naming a local place reduced by :func:`_no_local_path`."""
    from slmb.core.store import slmb_home

    home, out = slmb_home(), []
    for item in items:
        item = dict(item)
        for key in keys:
            value = item.get(key)
            if isinstance(value, str) and Path(value).is_absolute():
                path = Path(value)
                if path.is_relative_to(home):
                    item[key] = str(path.relative_to(home))
                else:
                    del item[key]
        out.append({k: v if k in keys else _no_local_path(v) for k, v in redact(item).items()})
    return out


def public_url(url: str) -> str:
    """``url`` without its user and password."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
                      ) if parts.hostname else url
