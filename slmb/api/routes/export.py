"""``GET /api/v1/models/{name}/export?format=hf``: a completed model as a zipped transformers checkpoint."""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from slmb.api.trust import check_name

router = APIRouter(tags=["models"])


def _zip_export(name: str, fmt: str) -> Path:
    """Export into a temporary directory and zip it there (stored, not compressed: safetensors barely compress).
    Returns the zip's path; the caller removes its directory once the response is sent. On disk, not in memory:
    a checkpoint can be gigabytes."""
    from slmb.core.export import export_hf

    tmp = Path(tempfile.mkdtemp(prefix="slmb-export-"))
    try:
        out = tmp / name
        result = export_hf(name, out, fmt)
        archive = tmp / f"{name}-{'gguf' if fmt == 'gguf' else 'hf'}.zip"  # export_hf refused any other format
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for f in result.files:
                zf.write(out / f, f"{name}/{f}")
                (out / f).unlink()  # the zip holds it now: half the disk
        return archive
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@router.get("/models/{name}/export", summary="A completed model as a transformers checkpoint (zip)")
async def export_model(name: str, format: str = Query(
        "hf", description="hf: a transformers checkpoint; gguf: model.gguf for llama.cpp (Llama/Qwen3)")
        ) -> FileResponse:
    """The zip holds ``<name>/config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer's
    files (``format=gguf``: ``<name>/model.gguf``). 404: no such model; 422: the canvas does not map to GPT-2,
    Llama or Qwen3 (the detail names the node)."""
    from slmb.core.export import ExportError
    from slmb.core.store import BrokenModelError, StoreError

    try:
        check_name(name)
    except ValueError as exc:
        raise HTTPException(422, f"model name: {exc}") from None
    try:
        archive = await run_in_threadpool(_zip_export, name, format)
    except ExportError as exc:
        raise HTTPException(422, str(exc)) from None
    except BrokenModelError as exc:
        raise HTTPException(409, str(exc)) from None
    except StoreError:
        raise HTTPException(404, f"no completed model named {name!r}") from None
    return FileResponse(archive, media_type="application/zip", filename=archive.name,
                        background=BackgroundTask(shutil.rmtree, archive.parent, ignore_errors=True))
