"""Atomic publication: write into a staging sibling, then appear in one rename, never replacing by accident.

A compile writes its bundle into ``.<name>.<pid>.*.partial`` next to the destination; only when the block
completes does the directory take its name, by one ``renameat2(RENAME_NOREPLACE)`` (a path that appeared
meanwhile, another compile's or the user's, is never replaced: this compile fails instead), or with
``force`` one ``renameat2(RENAME_EXCHANGE)`` with the old bundle. A kill at any moment leaves the old bundle
or the new one, never neither and never a mix; :func:`lora_runtime.bundle.open_bundle` refuses staging
directories, and the next compile to the same path removes those whose process is gone. Files that hold
bundles' hard-linked data are replaced the same way (a new inode), never rewritten in place.

:func:`new_file` does the same for one file a command writes (``run --outputs``, ``merge -o``, ...): exactly
the path named, never inside a bundle, never over an existing file without ``force``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_runtime.arrays import libc
from lora_runtime.errors import BundleError
from lora_runtime.manifest import FORMAT
from lora_runtime.names import MANIFEST

STAGING_SUFFIX = ".partial"


@contextmanager
def staging(out: str | os.PathLike[str], *, force: bool = False, what: str = "bundle",
            replaceable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A temporary sibling directory that becomes ``out`` only if the block completes.

    ``out`` appears in one step: a rename that never replaces (a path that appeared while the block ran is
    an error, and stays as it is), or with ``force`` an atomic exchange with the old ``what`` (a bundle, or
    what ``replaceable`` accepts), so a kill at any moment leaves the old one or the new one at ``out``,
    never neither and never a mix. Staging directories are ``.<name>.<pid>.*.partial``: :func:`open_bundle`
    refuses them, and the next compile to the same path removes those whose process is gone.
    """
    out = Path(out).absolute()
    ok = replaceable or _is_bundle_dir
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        try:
            out.rmdir()  # an empty folder made beforehand holds nothing to lose (rmdir fails if it just got a file)
        except OSError:
            pass
    if out.exists() or out.is_symlink():
        if not force:
            raise BundleError(f"{out}: already exists; pass --force (force=True) to replace it")
        _check_replaceable(out, what, ok)
    _inside_bundle(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=STAGING_SUFFIX, dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a bundle is an ordinary directory
    try:
        yield tmp
        _fsync_tree(tmp)
        with path_lock(out, exclusive=True):  # runtimes opening ``out`` finish first, and wait for this
            if force and (out.exists() or out.is_symlink()):
                _check_replaceable(out, what, ok)  # again: it may have changed while the block ran
                _exchange(tmp, out)  # tmp now holds the old one
            else:
                _rename_noreplace(tmp, out, "this compile" if what == "bundle" else f"this {what}")
        _fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def new_file(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """A temporary sibling that becomes exactly ``path`` if the block completes (the block writes it).

    Refused before anything is written (:func:`check_new_file`); published by :func:`publish_file`.
    """
    path = check_new_file(path, force=force)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish_file(tmp, path, force=force)
    finally:
        tmp.unlink(missing_ok=True)


def check_new_file(path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """``path`` as an absolute path a command may write: its folder exists, it is not inside a bundle (bundles
    are written whole, by a compile), not a directory, and not an existing file unless ``force``."""
    path = Path(path).absolute()
    if not path.parent.is_dir():
        raise BundleError(f"{path}: the folder {path.parent} does not exist")
    _inside_bundle(path.parent)
    if path.is_dir():
        raise BundleError(f"{path}: is a directory; name the file to write")
    if (path.exists() or path.is_symlink()) and not force:
        raise BundleError(f"{path}: already exists; pass --force to replace it")
    return path


def publish_file(tmp: Path, path: Path, *, force: bool = False) -> None:
    """``tmp`` becomes ``path``: with ``force`` by ``os.replace``; without, by a hard link, which fails if
    ``path`` appeared meanwhile (then nothing is replaced)."""
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise BundleError(f"{path}: appeared while this command ran; nothing was replaced (pass --force to "
                          "replace it)") from None
    tmp.unlink()


@contextmanager
def path_lock(path: str | os.PathLike[str], *, exclusive: bool) -> Iterator[None]:
    """A lock across processes on one bundle path: shared while a runtime opens the bundle, exclusive while a
    compile publishes it, so an open never sees half of one bundle and half of the next. The lock file lives in
    the temp folder (named by the path), not beside the bundle; where locks are unavailable, nothing is locked
    (``Runtime.open`` then notices a replacement by the manifest's inode and starts over)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    where = Path(os.path.realpath(Path(path).absolute().parent)) / Path(path).name
    folder = Path(tempfile.gettempdir()) / "lora_runtime-locks"
    try:
        folder.mkdir(mode=0o1777, exist_ok=True)
        fd = os.open(folder / (hashlib.sha256(os.fsencode(where)).hexdigest()[:32] + ".lock"),
                     os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _check_replaceable(out: Path, what: str, ok: Callable[[Path], bool]) -> None:
    if not out.is_dir() or out.is_symlink():
        raise BundleError(f"{out}: exists and is not a {what} directory; refusing to replace it")
    if any(out.iterdir()) and not ok(out):
        why = "no lora_runtime manifest" if what == "bundle" else "not written by lora_runtime"
        raise BundleError(f"{out}: exists and is not a {what} ({why}); refusing to replace it")


def _inside_bundle(folder: Path) -> None:
    """Refuse to write into a bundle (or below one): bundles are written whole, by a compile."""
    for p in (folder, *folder.parents):
        if (p / MANIFEST).is_file() and _is_bundle_dir(p):
            raise BundleError(f"{folder}: inside the bundle {p}; a bundle is only written whole by a compile: "
                              "write elsewhere")


def _rename_noreplace(src: Path, dst: Path, who: str) -> None:
    """``rename`` that fails if ``dst`` exists (Linux ``renameat2(RENAME_NOREPLACE)``; elsewhere a check first)."""
    sys.audit("lora_runtime.publish", str(src), str(dst))  # the moment the new directory appears (tests hook it)
    libc = _libc()
    if libc is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EEXIST, errno.ENOTEMPTY):
            raise BundleError(f"{dst}: appeared while {who} ran (another compile's, or written by hand); nothing "
                              "was replaced: pass --force to replace it")
        if err not in (errno.ENOSYS, errno.EINVAL):  # a filesystem without renameat2 flags falls through
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():
        raise BundleError(f"{dst}: appeared while {who} ran; nothing was replaced: pass --force to replace it")
    os.rename(src, dst)


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
    sys.audit("lora_runtime.publish", str(a), str(b))
    libc = _libc()
    if libc is not None:
        at_fdcwd, rename_exchange = -100, 2
        if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
    aside = a.with_name(a.name + ".old")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def _libc():  # noqa: ANN202  (the C library if it has renameat2 (glibc >= 2.28), else None)
    c = libc()
    return c if c is not None and hasattr(c, "renameat2") else None


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
