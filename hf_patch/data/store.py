"""Fingerprints of cached artefacts and atomic writes: the one place that decides whether something cached may be
reused, and the one way hf-patch writes a file or a directory so that no interruption leaves old and new mixed.

- A fingerprint is a JSON-able mapping of everything that determines an artefact (what made it, from which
  inputs, in which format). `reusable` compares the stored one with the expected one: a match is reused; a
  mismatch is rebuilt where hf-patch owns the place, or refused, naming what differed and the fix, where the user
  named it. Nothing is ever reused on a mismatch.
- `write_text` / `write_json` write a unique temporary file beside the target and `os.replace` it into place.
- `atomic_directory` builds a directory beside the target and renames it into place (under a lock on the parent,
  so concurrent writers take turns); the directory carries a marker (`MARKER`) listing what hf-patch wrote
  there and its fingerprint. A non-empty directory without the marker is not ours and is never replaced; entries
  of ours that we did not write are carried over, never deleted.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MARKER = ".hf_patch.json"  # in every directory hf-patch writes: {"fingerprint", "files"}


class StaleArtefact(ValueError):
    """A cached artefact the user named was made from other inputs than those asked for now."""


class NotOurs(FileExistsError):
    """A target that holds files hf-patch did not write."""


class ChecksumError(ValueError):
    """A downloaded or given file is not the pinned one (a user error: the message says what to do)."""


# ---------------------------------------------------------------- fingerprints


def digest(value: Any) -> str:
    """A short sha256 of the canonical JSON of `value` (keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_identity(path: str | Path) -> dict[str, Any]:
    """What identifies a file cheaply: {"name", "size", "mtime_ns"}."""
    stat = Path(path).stat()
    return {"name": Path(path).name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def _short(value: Any, limit: int = 80) -> str:
    """A value as JSON, its middle cut out past `limit` characters (the ends of a path or a hash tell them apart)."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit // 2 - 2] + "..." + text[-(limit // 2 - 1):]


def differences(stored: dict[str, Any] | None, expected: dict[str, Any]) -> str:
    """What differs between two fingerprints, in one line: "num_tokens 2048 -> 8192; model.id "a" -> "b"."""
    if not stored:
        return "it carries no fingerprint: written by an older hf-patch, or not by hf-patch"
    old, new = _flat(stored), _flat(expected)
    changed = [f"{key} {_short(old.get(key))} -> {_short(new.get(key))}"
               for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
    more = f"; and {len(changed) - 4} more" if len(changed) > 4 else ""
    return "; ".join(changed[:4]) + more if changed else "nothing"


def reusable(where: str | Path, stored: dict[str, Any] | None, expected: dict[str, Any], owned: bool,
             fix: str, what: str = "it") -> bool:
    """Whether the artefact at `where` (whose fingerprint is `stored`) may be reused for `expected`.

    A mismatch returns False after one line on stderr when hf-patch owns `where` (the caller rebuilds it), and
    raises StaleArtefact naming what differed and `fix` (e.g. "pass --force") when the user named it."""
    if stored == expected:
        return True
    why = differences(stored, expected)
    if owned:
        print(f"hf-patch: {where}: {what} was built from other inputs ({why}); rebuilding it", file=sys.stderr)
        return False
    raise StaleArtefact(f"{where}: {what} was built from other inputs than asked for ({why}): {fix}")


def read_marker(directory: str | Path) -> dict[str, Any] | None:
    """The marker of a directory hf-patch wrote ({"fingerprint", "files"}), or None."""
    try:
        marker = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def stored_fingerprint(directory: str | Path) -> dict[str, Any] | None:
    """The fingerprint a directory hf-patch wrote carries, or None."""
    return (read_marker(directory) or {}).get("fingerprint")


def sha256sum(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def check_sha256(path: str | Path, expected: str, what: str, remedy: str) -> None:
    """Raise ChecksumError, saying what to do, unless the file at `path` has the pinned sha256 `expected`."""
    if (got := sha256sum(path)) != expected:
        raise ChecksumError(f"{path}: sha256 {got}, but {what} is pinned at {expected}. {remedy}")


# ---------------------------------------------------------------- atomic files


@contextlib.contextmanager
def replacing(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A unique temporary file beside `path` for the block to write (named `.<name>.<random><suffix>`), moved onto
    `path` with `os.replace` when the block ends without error, removed otherwise: concurrent writers never share
    a temporary file, and a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (`replacing`), flushed to disk before the rename."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """`data` as JSON (objects it cannot encode as their str), atomically (`write_text`)."""
    return write_text(path, json.dumps(data, indent=indent, default=str, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- atomic directories


def foreign_entries(target: Path) -> list[str]:
    """The entries of directory `target` that hf-patch did not write (all of them when it carries no marker)."""
    if not target.is_dir():
        return []
    ours = set((read_marker(target) or {}).get("files", [])) | {MARKER}
    return sorted(p.name for p in target.iterdir() if p.name not in ours)


def check_target(target: str | Path, exclusive: bool = True) -> None:
    """Raise NotOurs when `target` may not be written: a file, or (`exclusive`) a non-empty directory without our
    marker. Called before the expensive work, and again just before the rename."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotOurs(f"{target} is a file, not a directory hf-patch wrote: move it away or choose another path")
    if exclusive and target.is_dir() and read_marker(target) is None and (entries := foreign_entries(target)):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise NotOurs(f"{target} holds files hf-patch did not write ({shown}); it deletes nothing it did not write: "
                      "choose an empty or new directory, or move them away")


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on `directory` (flock on the directory itself: no lock file), for renames inside it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): renames stay atomic, concurrent writers just race
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a filesystem without flock: renames stay atomic, writers just race
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _carry_over(target: Path, tmp: Path, names: list[str]) -> None:
    """Hard-link (or copy) `names` of `target` into `tmp`: carried into the new directory, never moved out of the
    old one, so an interruption loses nothing."""
    for name in names:
        source, dest = target / name, tmp / name
        if dest.exists() or dest.is_symlink():
            continue
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, dest, copy_function=_link_or_copy, symlinks=True)
        else:
            _link_or_copy(source, dest)


def _link_or_copy(source: str | Path, dest: str | Path) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), dest)
        return
    try:
        os.link(source, dest)
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        shutil.copy2(source, dest)


@contextlib.contextmanager
def atomic_directory(target: str | Path, fingerprint: dict[str, Any] | None = None,
                     exclusive: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; when the block succeeds it replaces `target` by a
    rename, when it fails it is deleted: `target` is the old directory or the new one, never a mix.

    The new directory gets a marker with `fingerprint` and the entries written. What the old directory holds that
    hf-patch did not write there is carried over (hard links) into the new one. `exclusive`: the directory is
    hf-patch's alone (a converted model, a corpus), so a non-empty `target` without our marker is refused
    (NotOurs) rather than replaced; otherwise (a basis directory, which may sit among other outputs) only the
    entries written replace theirs."""
    target = Path(target)
    check_target(target, exclusive)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary cache directory
    old = None
    try:
        yield tmp
        written = sorted(p.name for p in tmp.iterdir() if p.name != MARKER)
        (tmp / MARKER).write_text(json.dumps({"fingerprint": fingerprint, "files": written}, indent=1) + "\n")
        with _locked(target.parent):
            check_target(target, exclusive)
            if target.is_dir():
                _carry_over(target, tmp, [n for n in foreign_entries(target) if n not in written])
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.rename(target, old / target.name)
                try:
                    os.rename(tmp, target)
                except BaseException:
                    os.rename(old / target.name, target)  # put the old one back: never nothing in its place
                    raise
            else:
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
