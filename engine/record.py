"""Atomic writing of outputs: a folder appears whole or not at all."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path


def _clean(value):
    """JSON-safe: NaN and infinities become null, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(obj) -> str:
    return json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n"


def write_folder(out_dir, writers: dict) -> Path:
    """Write ``{file name: fn(path)}`` into a temporary sibling folder, then swap it in.

    An existing ``out_dir`` is replaced only after every file was written.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, write_fn in writers.items():
            write_fn(tmp / name)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "previous")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def json_writer(obj):
    text = dumps(obj)
    return lambda path: Path(path).write_text(text)
