"""The bundle: the contract between the compiler and the runtime.

A bundle is a directory::

    manifest.json                 generation, points, slot table, adapters, use-cases, hashes, versions
    model.onnx                    the base graph with LoRA branches (base weights inline or linked)
    patches/<adapter>.safetensors v1/v2: one adapter's slot values, padded to the slot shapes ("ROM")
    patches/group.safetensors     v3: the rank-concatenated A/B of every adapter
    <base data files>             external data of the base model, hard-linked, never rewritten

It is written into a temporary sibling directory and renamed into place, so a failed or killed
compile leaves nothing that loads as a bundle. :func:`open_bundle` checks every file named in the
manifest (inside the bundle, size, SHA-256) and every patch header against the slot table before
anything uses it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_runtime.errors import BundleError, InputError, TensorFileError, UseCaseError
from lora_runtime.tensorfile import read_header

FORMAT = "lora_runtime.bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "model.onnx"
GROUP_PATCH = "patches/group.safetensors"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
INTEGRITY = "manifest_sha256"
SLOT_KINDS = ("lora_A", "lora_B", "lora_scaling", "strength", "encoding")
_DTYPE_BYTES = {"float32": 4, "float16": 2, "uint8": 1, "uint16": 2}
_SAFETENSORS_NAMES = {"float32": "F32", "float16": "F16", "uint8": "U8", "uint16": "U16"}
UNION_ENCODINGS = "patches/encodings.union.safetensors"  # ad-hoc strengths: calibrated over every use-case


@dataclass(frozen=True)
class Column:
    """Adapter ``adapter`` owns rank columns [start, stop) at a point, with its PEFT scaling there."""

    adapter: str
    start: int
    stop: int
    scaling: float


@dataclass(frozen=True)
class Point:
    """An attachment point: the base op, its size, the slot rank and who sits there."""

    module: str
    node: str
    op_type: str
    weight: str  # the base weight initializer
    weight_transposed: bool  # stored (out, in) rather than (in, out)
    in_features: int
    out_features: int
    rank: int
    columns: tuple[Column, ...]


@dataclass(frozen=True)
class Slot:
    """An updatable tensor: what a switch writes. Shapes are fixed at compile time."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str  # one of SLOT_KINDS

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        n = _DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    source: str
    sha256: str  # of the adapter's safetensors file
    config: dict[str, Any]
    nbytes: int  # its own LoRA weights, unpadded, in float32
    patch: str | None  # v1/v2: its patch file; v3: None (the group patch holds it)


@dataclass(frozen=True)
class UseCase:
    name: str
    strengths: dict[str, float]  # adapter -> strength; empty: the base model alone
    encodings: str | None = None  # updatable encodings: this use-case's encoding slot values (a patch)


@dataclass(frozen=True)
class FileInfo:
    sha256: str
    nbytes: int


@dataclass(frozen=True)
class BaseInfo:
    name: str  # file name of the base model the bundle was compiled from
    sha256: str  # of the base .onnx file
    nbytes: int
    data_files: tuple[str, ...]  # external data files, linked into the bundle under the same names


@dataclass(frozen=True)
class Manifest:
    generation: str
    base: BaseInfo
    points: tuple[Point, ...]
    slots: tuple[Slot, ...]
    adapters: tuple[AdapterInfo, ...]
    use_cases: tuple[UseCase, ...]
    files: dict[str, FileInfo]
    versions: dict[str, str]
    graph: str = GRAPH
    group_patch: str | None = None
    default_adapter: str | None = None  # v2: the adapter the graph's parameters hold
    union_encodings: str | None = None  # updatable encodings: the set used for ad-hoc strengths
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def use_case(self, name: str) -> UseCase:
        for u in self.use_cases:
            if u.name == name:
                return u
        raise UseCaseError(f"unknown use-case {name!r}; this bundle has {', '.join(self.use_case_names) or 'none'}")

    @property
    def use_case_names(self) -> list[str]:
        return [u.name for u in self.use_cases]

    @property
    def adapter_names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def adapter(self, name: str) -> AdapterInfo:
        for a in self.adapters:
            if a.name == name:
                return a
        raise UseCaseError(f"unknown adapter {name!r}; this bundle has {', '.join(self.adapter_names)}")

    def strength_value(self, strengths: Mapping[str, float]) -> np.ndarray:
        """The ``lora_alpha`` value for adapter strengths: a scalar (v1/v2) or one entry per adapter (v3)."""
        for name, s in strengths.items():
            self.adapter(name)
            if not isinstance(s, (int, float, np.floating)) or isinstance(s, bool) or not math.isfinite(s):
                raise InputError(f"strength of adapter {name!r} must be a finite number, got {s!r}")
        if self.generation == "v3":
            return np.array([float(strengths.get(a, 0.0)) for a in self.adapter_names], np.float32)
        if len(strengths) > 1:
            raise UseCaseError(f"{self.generation} holds one adapter at a time, got {len(strengths)}: "
                               "compile with --generation v3 for mixes")
        return np.array(next(iter(strengths.values()), 0.0), np.float32)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any, where: str) -> Manifest:
        try:
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise BundleError(f"{where}: not a lora_runtime bundle manifest")
            if d.get("format_version") != FORMAT_VERSION:
                raise BundleError(f"{where}: format_version {d.get('format_version')!r}, this lora_runtime reads "
                                  f"{FORMAT_VERSION}; recompile the bundle")
            for slot in d["slots"]:  # what Slot.nbytes and the runtime's arenas rely on
                if slot["kind"] not in SLOT_KINDS or slot["dtype"] not in _DTYPE_BYTES:
                    raise BundleError(f"{where}: slot {slot['name']!r} has kind {slot['kind']!r} and dtype "
                                      f"{slot['dtype']!r}; expected one of {SLOT_KINDS} and {tuple(_DTYPE_BYTES)}")
            return cls(
                generation=str(d["generation"]),
                base=BaseInfo(**{**d["base"], "data_files": tuple(d["base"]["data_files"])}),
                points=tuple(Point(**{**p, "columns": tuple(Column(**c) for c in p["columns"])}) for p in d["points"]),
                slots=tuple(Slot(**{**s, "shape": tuple(s["shape"])}) for s in d["slots"]),
                adapters=tuple(AdapterInfo(**a) for a in d["adapters"]),
                use_cases=tuple(UseCase(**u) for u in d["use_cases"]),
                files={k: FileInfo(**v) for k, v in d["files"].items()},
                versions=dict(d["versions"]), graph=d["graph"], group_patch=d.get("group_patch"),
                default_adapter=d.get("default_adapter"), union_encodings=d.get("union_encodings"),
                extra=dict(d.get("extra", {})))
        except (KeyError, TypeError, AttributeError) as e:
            raise BundleError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e


@dataclass(frozen=True)
class Bundle:
    """An opened, validated bundle directory."""

    path: Path
    manifest: Manifest

    def file(self, rel: str) -> Path:
        return inside(self.path, rel)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_cached(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a large file, remembered per (device, inode, size, mtime) in the user's cache.

    Base weights are gigabytes that never change: hashing them once per file, not once per compile,
    keeps compile time growing with adapter bytes rather than model bytes.
    """
    st = os.stat(path)
    key = f"{st.st_dev}:{st.st_ino}"  # the file itself, whichever hard link names it
    stamp = [st.st_size, st.st_mtime_ns]  # not ctime: every new hard link changes it
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora_runtime" / "sha256.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(key) if isinstance(known, dict) else None
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_file(path)
    try:
        known = known if isinstance(known, dict) else {}
        known[key] = {"stamp": stamp, "sha256": digest}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache)
    except OSError:
        pass  # an unwritable cache only costs time
    return digest


def inside(root: Path, rel: str) -> Path:
    """``root / rel``, refusing absolute paths, '..' and symlinks that leave the bundle."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise BundleError(f"{root}: manifest names the path {rel!r}, which is not inside the bundle")
    p = root / rel
    if not p.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"{root}: {rel!r} resolves outside the bundle")
    return p


def open_bundle(path: str | os.PathLike[str], *, verify_hashes: bool = True, verify_base: bool = False,
                base: str | os.PathLike[str] | None = None) -> Bundle:
    """Read and validate a bundle: manifest, every file's size and hash, every patch against the slots.

    The base model's external data files (gigabytes, hard-linked from the base) are checked by size;
    ``verify_base=True`` hashes them too (about a second per GB). ``base``: the base model .onnx the
    caller deploys with; the bundle must have been compiled from exactly that file.
    """
    root = Path(path)
    mpath = root / MANIFEST
    if root.name.startswith(".") and root.name.endswith(STAGING_SUFFIX):
        raise BundleError(f"{root}: an unfinished compile's staging directory, not a bundle")
    if not mpath.is_file():
        raise BundleError(f"{root}: not a bundle (no {MANIFEST})")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(mpath.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from e
    if isinstance(data, dict) and data.get("format") == FORMAT:
        if INTEGRITY not in data:
            raise BundleError(f"{mpath}: no manifest_sha256 (written by an older lora_runtime?); recompile the bundle")
        if data[INTEGRITY] != _digest(data):
            raise BundleError(f"{mpath}: manifest_sha256 does not match the manifest (edited or corrupt)")
    manifest = Manifest.from_json(data, str(mpath))
    for rel, info in manifest.files.items():
        p = inside(root, rel)
        if not p.is_file():
            raise BundleError(f"{root}: file {rel!r} named in the manifest is missing")
        size = p.stat().st_size
        if size != info.nbytes:
            raise BundleError(f"{p}: {size} bytes, the manifest says {info.nbytes} (truncated or replaced)")
        if verify_hashes and (verify_base or rel not in manifest.base.data_files) and sha256_file(p) != info.sha256:
            raise BundleError(f"{p}: SHA-256 does not match the manifest (tampered or corrupt)")
    if base is not None:
        try:
            digest = sha256_file(base)
        except OSError as e:
            raise BundleError(f"{base}: cannot read the base model ({e.strerror or e})") from e
        if digest != manifest.base.sha256:
            raise BundleError(f"{root}: compiled for base model {manifest.base.name} (sha256 "
                              f"{manifest.base.sha256[:12]}…), not {base} (sha256 {digest[:12]}…)")
    bundle = Bundle(root, manifest)
    for rel, slots in _patch_files(manifest):
        if rel not in manifest.files:
            raise BundleError(f"{root}: patch {rel!r} is not listed in the manifest's files")
        check_patch(bundle, rel, slots)
    return bundle


def _patch_files(m: Manifest) -> list[tuple[str, list[Slot]]]:
    weights = [a.patch for a in m.adapters if a.patch] + ([m.group_patch] if m.group_patch else [])
    encodings = [u.encodings for u in m.use_cases if u.encodings] + ([m.union_encodings] if m.union_encodings else [])
    return [(w, patched_slots(m)) for w in weights] + [(e, encoding_slots(m)) for e in encodings]


def patched_slots(m: Manifest) -> list[Slot]:
    """The slots a weight patch carries: LoRA A/B (and v1/v2's lora_scaling)."""
    return [s for s in m.slots if s.kind not in ("strength", "encoding")]


def encoding_slots(m: Manifest) -> list[Slot]:
    """The slots an encodings patch carries: the scales and zero points that change per use-case."""
    return [s for s in m.slots if s.kind == "encoding"]


def check_patch(bundle: Bundle, rel: str, slots: list[Slot] | None = None) -> None:
    """A patch's header must list exactly its slots, in slot order, with their shapes and dtypes."""
    p = bundle.file(rel)
    try:
        tf = read_header(p)
    except TensorFileError as e:
        raise BundleError(str(e)) from e
    slots = patched_slots(bundle.manifest) if slots is None else slots
    want = [(s.name, s.shape, _SAFETENSORS_NAMES[s.dtype]) for s in slots]
    got = [(e.name, e.shape, e.dtype) for e in tf.entries.values()]
    if got != want:
        diff = next(((w, g) for w, g in zip(want, got) if w != g), (want[len(got):][:1], got[len(want):][:1]))
        raise BundleError(f"{p}: patch does not fit the slot table (expected {diff[0]}, found {diff[1]})")


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


def write_manifest(root: Path, manifest: Manifest) -> None:
    data = manifest.to_json()
    data[INTEGRITY] = _digest(data)
    (root / MANIFEST).write_text(json.dumps(data, indent=1) + "\n")


def _digest(data: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON, without the digest itself: catches edits and corruption."""
    body = {k: v for k, v in data.items() if k != INTEGRITY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_table(root: Path, rels: list[str], cached: tuple[str, ...] = ()) -> dict[str, FileInfo]:
    """Size and SHA-256 of each file; the ``cached`` ones (hard-linked base data) through the hash cache."""
    return {rel: FileInfo(sha256_cached(root / rel) if rel in cached else sha256_file(root / rel),
                          (root / rel).stat().st_size) for rel in rels}


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
