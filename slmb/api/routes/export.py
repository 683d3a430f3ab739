"""``GET /api/v1/models/{name}/export?format=hf``: a completed model as a zipped transformers checkpoint."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from slmb.api.trust import check_name

router = APIRouter(tags=["models"])


def _zip_export(name: str, fmt: str) -> bytes:
    """Export into a temporary directory and zip it (stored, not compressed: safetensors barely compress)."""
    from slmb.core.export import export_hf

    with tempfile.TemporaryDirectory(prefix="slmb-export-") as tmp:
        out = Path(tmp) / name
        result = export_hf(name, out, fmt)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for f in result.files:
                zf.write(out / f, f"{name}/{f}")
        return buf.getvalue()


@router.get("/models/{name}/export", summary="A completed model as a transformers checkpoint (zip)")
async def export_model(name: str, format: str = Query(
        "hf", description="hf: a transformers checkpoint; gguf: model.gguf for llama.cpp (Llama/Qwen3)")) -> Response:
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
        data = await run_in_threadpool(_zip_export, name, format)
    except ExportError as exc:
        raise HTTPException(422, str(exc)) from None
    except BrokenModelError as exc:
        raise HTTPException(409, str(exc)) from None
    except StoreError:
        raise HTTPException(404, f"no completed model named {name!r}") from None
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{name}-{format}.zip"'})
