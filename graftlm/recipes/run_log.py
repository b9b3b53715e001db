"""`RunLog`: one JSON object per line (step, loss, lr, tokens/s, eval loss, graft extras), main process only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, path: Path, enabled: bool, append: bool = False):
        self.path = path
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not append:
                path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return float(f"{value:.7g}") if math.isfinite(value) else str(value)
    return value


def read_log(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
