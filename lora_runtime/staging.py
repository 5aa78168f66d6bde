"""Atomic publication of a directory: write into a staging sibling, then appear in one rename.

A compile writes its bundle into ``.<name>.<pid>.*.partial`` next to the destination; only when the block
completes does the directory take its name, by one ``rename`` (or, to replace an old bundle, one
``renameat2(RENAME_EXCHANGE)``). A kill at any moment leaves the old bundle or the new one, never neither
and never a mix; :func:`lora_runtime.bundle.open_bundle` refuses staging directories, and the next
compile to the same path removes those whose process is gone.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_runtime.errors import BundleError
from lora_runtime.manifest import FORMAT
from lora_runtime.names import MANIFEST

STAGING_SUFFIX = ".partial"


@contextmanager
def staging(out: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """A temporary sibling directory that becomes ``out`` only if the block completes.

    ``out`` appears in one step: a rename, or with ``force`` an atomic exchange with the old bundle
    (``renameat2(RENAME_EXCHANGE)`` on Linux), so a kill at any moment leaves the old bundle or the new
    one at ``out``, never neither and never a mix. Staging directories are ``.<name>.<pid>.*.partial``:
    :func:`open_bundle` refuses them, and the next compile to the same path removes those whose
    process is gone.
    """
    out = Path(out).absolute()
    if out.exists() or out.is_symlink():
        if not force:
            raise BundleError(f"{out}: already exists; pass --force (force=True) to replace it")
        if not out.is_dir() or out.is_symlink():
            raise BundleError(f"{out}: exists and is not a bundle directory; refusing to replace it")
        if any(out.iterdir()) and not _is_bundle_dir(out):
            raise BundleError(f"{out}: exists and is not a bundle (no lora_runtime manifest); refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=STAGING_SUFFIX, dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a bundle is an ordinary directory
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists():
            _exchange(tmp, out)  # tmp now holds the old bundle
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_bundle_dir(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _remove_stale_staging(out: Path) -> None:
    """Staging directories of compiles to ``out`` whose process no longer runs (killed mid-way)."""
    for p in out.parent.glob(f".{glob.escape(out.name)}.*{STAGING_SUFFIX}"):
        pid = p.name[len(out.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> None:
    """Swap two directory entries atomically (Linux ``renameat2``); elsewhere, two renames."""
    libc = _libc()
    if libc is not None:
        at_fdcwd, rename_exchange = -100, 2
        if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
    aside = a.with_name(a.name + ".old")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def _libc():  # noqa: ANN202  (a ctypes.CDLL with renameat2, or None)
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.renameat2  # noqa: B018  (present in glibc >= 2.28)
        return libc
    except (OSError, AttributeError):
        return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)



def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
