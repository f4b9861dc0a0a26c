"""Where gemma-export keeps assembled real weights and converted tokenizers (outside the repo)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("GEMMA_EXPORT_CACHE") or (Path.home() / ".cache" / "gemma-export")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
