"""Files in and out: atomic writes, strict JSON, and output paths checked before the work starts.

Each write goes to a temporary file in the same folder, is flushed to disk, then renamed over the
target (`os.replace` is atomic on POSIX and Windows), so a killed run never leaves half a file. The
file then gets the permissions the user's umask gives a new file (the temporary file is created
0600), so JSON, tensors and plots all end up alike.

JSON is always strict: NaN and infinity are not JSON, and a result that holds one is a bug, so
`atomic_write_json` refuses it instead of writing `NaN` that strict parsers reject.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from culturalign.errors import CulturalignError

STDOUT = "-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to produce the file, then move it to `path` in one step."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def find_non_finite(data, where: str = "$") -> str | None:
    """The JSON path of the first NaN or infinity in `data`, or None."""
    if isinstance(data, float) and not math.isfinite(data):
        return where
    if isinstance(data, dict):
        for k, v in data.items():
            found = find_non_finite(v, f"{where}.{k}")
            if found:
                return found
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            found = find_non_finite(v, f"{where}[{i}]")
            if found:
                return found
    return None


def dumps(data, indent: int | None = 1) -> str:
    """Strict JSON text; a NaN or infinity is an error naming where it is."""
    bad = find_non_finite(data)
    if bad:
        raise CulturalignError(f"refusing to write a non-finite number (NaN or infinity) at {bad}: results must be finite")
    return json.dumps(data, indent=indent, allow_nan=False)


def atomic_write_json(path: str | Path, data, indent: int = 1) -> None:
    atomic_write_text(path, dumps(data, indent) + "\n")


def write_json_output(path: str | Path, data, indent: int = 2) -> None:
    """Write JSON to a file (atomically) or, for `-`, to standard output."""
    if str(path) == STDOUT:
        sys.stdout.write(dumps(data, indent) + "\n")
        sys.stdout.flush()
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data, indent)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_writable(folder: Path, what: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".culturalign-probe-", dir=folder)
    except OSError as e:
        raise CulturalignError(f"{what}: cannot write in {str(folder)!r} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def check_output_file(path: str | Path, flag: str) -> None:
    """Fail now, before any work, if `path` cannot be written as a file (`-` means standard output)."""
    if str(path) == STDOUT:
        return
    p = Path(path).expanduser()
    what = f"{flag} {str(path)!r}"
    if p.is_dir():
        raise CulturalignError(f"{what} is a folder; expected a file path")
    if p.exists() and not p.is_file():
        raise CulturalignError(f"{what} exists and is not a regular file")
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise CulturalignError(f"{what}: {str(base)!r} is a file, not a folder")
    _probe_writable(base, what)


def check_output_dir(path: str | Path, flag: str) -> None:
    """Fail now, before any work, if `path` cannot be created or written as a folder."""
    p = Path(path).expanduser()
    what = f"{flag} {str(path)!r}"
    if p.exists() and not p.is_dir():
        raise CulturalignError(f"{what} exists and is not a folder")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise CulturalignError(f"{what}: {str(base)!r} is a file, not a folder")
    _probe_writable(base, what)


def read_text_file(path: str | Path, what: str, expected: str = "a file") -> str:
    """A user's text file (UTF-8, a BOM allowed), or one line naming it: a folder, missing, not UTF-8, unreadable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise CulturalignError(f"{what} {str(p)!r} is a folder; expected {expected}")
    try:
        return p.read_text("utf-8-sig")
    except FileNotFoundError:
        raise CulturalignError(f"{what} {str(p)!r} not found; expected {expected}") from None
    except UnicodeDecodeError as e:
        raise CulturalignError(f"{what} {str(p)!r} is not UTF-8 text (undecodable byte at offset {e.start})") from None
    except OSError as e:
        raise CulturalignError(f"{what} {str(p)!r} cannot be read ({e.strerror or e})") from None


def read_json_file(path: str | Path, what: str) -> object:
    """Decode a JSON file, or raise one line naming it (missing, a folder, not UTF-8, not JSON)."""
    text = read_text_file(path, what, "a JSON file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CulturalignError(f"{what} {str(path)!r} is not valid JSON ({e})") from None
