"""Atomic writes: a reader (or a kill -9) never sees a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from dana.errors import DanaError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask can only be read by setting it


def _atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (strict JSON: no NaN)."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    _atomic(path, lambda f: f.write(text.encode()))


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    """Write ``records`` (one dict per row) as CSV to ``path`` atomically; the columns are
    the keys in first-seen order, an absent or ``None`` value an empty cell."""
    import csv
    import io

    columns = list(dict.fromkeys(key for record in records for key in record))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    _atomic(path, lambda f: f.write(text.getvalue().encode()))


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DanaError(f"cannot read {path}: {err}; delete it to start over") from None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` atomically."""
    _atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a corrupt or foreign file: say which and what to do
        raise DanaError(f"cannot load checkpoint {path} ({err}); delete it to start over") from None


def ensure_writable(folder: Path) -> Path:
    """Create ``folder`` and check that files can be written there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DanaError(
            f"cannot write to {folder} ({err.strerror}): choose another --out"
        ) from None
    return folder
