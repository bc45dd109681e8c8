"""Atomic writes: a reader (or a kill -9) never sees a half-written file.

Checkpoints carry a SHA-256 digest of their payload and are verified when read, so a
corrupted file is refused instead of resumed from.
"""

from __future__ import annotations

import hashlib
import io
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


#: The first line of a checkpoint file; the second is the payload's SHA-256 (hex).
CHECKPOINT_MAGIC = b"dana-checkpoint-v1\n"


def _atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):  # a full disk, a quota, a file-size limit
            raise _write_error(path, err) from None
        raise


def _write_error(path: Path, err: OSError) -> DanaError:
    return DanaError(
        f"cannot write {path} ({err.strerror or err}): free space there or choose another "
        "--out, then run the same command again (the previous files are intact)"
    )


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


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a file shipped from another machine)."""
    _atomic(path, lambda f: f.write(data))


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DanaError(f"cannot read {path}: {err}; delete it to start over") from None


def save_model(path: Path, model: torch.nn.Module) -> None:
    """``model``'s ``state_dict`` saved atomically, a plain file for ``torch.load``; on the
    CPU, so that a model trained on a GPU loads anywhere without ``map_location``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic(path, lambda f: torch.save(state, f))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` atomically, with the payload's SHA-256 for :func:`load_checkpoint`.

    The file is ``CHECKPOINT_MAGIC``, the hex digest and a newline, then the payload.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    digest = hashlib.sha256(payload).hexdigest().encode()

    def write(f: IO[bytes]) -> None:
        f.write(CHECKPOINT_MAGIC + digest + b"\n")
        f.write(payload)

    _atomic(path, write)


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The state :func:`save_checkpoint` wrote, after checking its digest: a corrupt,
    truncated or foreign file is a one-line :class:`DanaError`, never resumed from."""
    path = Path(path)

    def refuse(why: str) -> DanaError:
        return DanaError(f"cannot resume from {path}: {why}; delete it to start over")

    try:
        data = path.read_bytes()
    except OSError as err:
        raise refuse(err.strerror or str(err)) from None
    head, digest_end = len(CHECKPOINT_MAGIC), len(CHECKPOINT_MAGIC) + 65
    if not data.startswith(CHECKPOINT_MAGIC) or data[digest_end - 1 : digest_end] != b"\n":
        raise refuse("it is not a dana checkpoint (or one from an older version)")
    payload = memoryview(data)[digest_end:]
    if hashlib.sha256(payload).hexdigest().encode() != data[head : digest_end - 1]:
        raise refuse("its contents do not match their digest (the file is corrupted)")
    try:
        state = torch.load(io.BytesIO(payload), map_location=device, weights_only=True)
    except Exception as err:  # digest right but unreadable: written by another torch?
        raise refuse(f"torch cannot read it ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise refuse("it does not hold a run's state")
    return state


def ensure_writable(folder: Path) -> Path:
    """Create ``folder`` and check that files can be written there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A probe of its own: concurrent calls on one folder must not delete each other's.
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise DanaError(
            f"cannot write to {folder} ({err.strerror}): choose another --out"
        ) from None
    return folder
