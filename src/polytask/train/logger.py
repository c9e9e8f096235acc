"""Run logs: one JSON object per line (steps and evaluations), optionally TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["JsonlLogger"]


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class JsonlLogger:
    """Appends events to ``path`` (created on first write); flushes every line so a killed run
    keeps its log. ``tensorboard_dir`` mirrors the scalars to TensorBoard when given."""

    def __init__(self, path: str | Path | None, tensorboard_dir: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._file = None
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is an optional extra
                raise ImportError(
                    "tensorboard=True needs the tensorboard package: pip install tensorboard"
                ) from exc
            self._tb = SummaryWriter(str(tensorboard_dir))

    def log(self, event: str, **fields: Any) -> None:
        record = {"event": event, **{k: _plain(v) for k, v in fields.items()}}
        if self.path is not None:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8")
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            step = fields.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self._tb.add_scalar(f"{event}/{key}", value, step)
                elif isinstance(value, dict):
                    for sub, v in value.items():
                        if isinstance(v, (int, float)):
                            self._tb.add_scalar(f"{event}/{key}/{sub}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
