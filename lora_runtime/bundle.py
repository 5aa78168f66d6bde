"""The bundle: the contract between the compiler and the runtime.

A bundle is a directory::

    manifest.json                 generation, points, slot table, adapters, use-cases, hashes, versions
    model.onnx                    the base graph with LoRA branches (base weights inline or linked)
    patches/<adapter>.safetensors v1/v2: one adapter's slot values, padded to the slot shapes ("ROM")
    patches/group.safetensors     v3: the rank-concatenated A/B of every adapter
    patches/saved/<adapter>.safetensors  modules_to_save: an adapter's saved modules (_base: the base's values)
    <base data files>             external data of the base model, hard-linked, never rewritten

It is written into a staging sibling and renamed into place (``lora_runtime.staging``), so a failed or
killed compile leaves nothing that loads as a bundle. :func:`open_bundle` checks every file named in the
manifest (inside the bundle, size, SHA-256) and every patch header against the slot table before
anything uses it. The manifest's types are in ``lora_runtime.manifest``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lora_runtime.errors import BundleError, TensorFileError
from lora_runtime.manifest import FORMAT, INTEGRITY, FileInfo, Manifest, Slot, digest
from lora_runtime.names import MANIFEST
from lora_runtime.staging import STAGING_SUFFIX
from lora_runtime.tensorfile import TensorFile, read_header

MAX_MANIFEST_BYTES = 64 * 1024 * 1024
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "int8": "I8", "uint8": "U8", "int16": "I16",
                      "uint16": "U16"}


@dataclass(frozen=True)
class Bundle:
    """An opened, validated bundle directory."""

    path: Path
    manifest: Manifest
    headers: Mapping[str, TensorFile] = field(default_factory=dict, compare=False)  # patches open_bundle checked
    stamp: tuple[int, int, int] | None = field(default=None, compare=False)  # its manifest's, when opened

    def file(self, rel: str) -> Path:
        return inside(self.path, rel)

    def header(self, rel: str) -> TensorFile:
        """The header of patch ``rel``: as :func:`open_bundle` validated it, or read now (a bundle being built)."""
        if rel in self.headers:
            return self.headers[rel]
        try:
            return read_header(self.file(rel))
        except TensorFileError as e:
            raise BundleError(str(e)) from e


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


def manifest_stamp(root: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    """(device, inode, mtime) of a bundle's manifest, or None: a bundle replaced by ``compile --force`` (a new
    directory swapped in) has a new one."""
    try:
        st = os.stat(Path(root) / MANIFEST)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


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
    stamp = manifest_stamp(root)
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
        if data[INTEGRITY] != digest(data):
            raise BundleError(f"{mpath}: manifest_sha256 does not match the manifest (edited or corrupt)")
    manifest = Manifest.from_json(data, str(mpath))
    for rel, info in manifest.files.items():
        p = inside(root, rel)
        if not p.is_file():
            raise BundleError(f"{root}: file {rel!r} named in the manifest is missing")
        size = p.stat().st_size
        if size != info.nbytes and rel in manifest.base.data_files:
            raise BundleError(f"{p}: {size} bytes, the manifest says {info.nbytes}: the base model's data, hard-linked "
                              "from its folder, was rewritten in place after this bundle was compiled; recompile the "
                              "bundle from the current base model (compile ... --force)")
        if size != info.nbytes:
            raise BundleError(f"{p}: {size} bytes, the manifest says {info.nbytes} (truncated or replaced)")
        if verify_hashes and (verify_base or rel not in manifest.base.data_files) and sha256_file(p) != info.sha256:
            raise BundleError(f"{p}: SHA-256 does not match the manifest (tampered or corrupt)")
    if base is not None:
        try:
            given = sha256_file(base)
        except OSError as e:
            raise BundleError(f"{base}: cannot read the base model ({e.strerror or e})") from e
        if given != manifest.base.sha256:
            raise BundleError(f"{root}: compiled for base model {manifest.base.name} (sha256 "
                              f"{manifest.base.sha256[:12]}…), not {base} (sha256 {given[:12]}…)")
    bundle = Bundle(root, manifest)
    headers = {}
    for rel, slots in _patch_files(manifest):
        if rel not in manifest.files:
            raise BundleError(f"{root}: patch {rel!r} is not listed in the manifest's files")
        headers[rel] = check_patch(bundle, rel, slots)
    return Bundle(root, manifest, headers, stamp)


def _patch_files(m: Manifest) -> list[tuple[str, list[Slot]]]:
    weights = [a.patch for a in m.adapters if a.patch] + ([m.group_patch] if m.group_patch else [])
    encodings = [u.encodings for u in m.use_cases if u.encodings] + ([m.union_encodings] if m.union_encodings else [])
    saved = [a.saved_patch for a in m.adapters if a.saved_patch] + ([m.saved_patch] if m.saved_patch else [])
    return ([(w, m.patched_slots) for w in weights] + [(e, m.encoding_slots) for e in encodings]
            + [(s, m.saved_slots) for s in saved])


def check_patch(bundle: Bundle, rel: str, slots: list[Slot] | None = None) -> TensorFile:
    """A patch's header must list exactly its slots, in slot order, with their shapes and dtypes."""
    p = bundle.file(rel)
    try:
        tf = read_header(p)
    except TensorFileError as e:
        raise BundleError(str(e)) from e
    slots = bundle.manifest.patched_slots if slots is None else slots
    want = [(s.name, s.shape, SAFETENSORS_DTYPES[s.dtype]) for s in slots]
    got = [(e.name, e.shape, e.dtype) for e in tf.entries.values()]
    if got != want:
        diff = next(((w, g) for w, g in zip(want, got) if w != g), (want[len(got):][:1], got[len(want):][:1]))
        raise BundleError(f"{p}: patch does not fit the slot table (expected {diff[0]}, found {diff[1]})")
    return tf


def write_manifest(root: Path, manifest: Manifest) -> None:
    data = manifest.to_json()
    data[INTEGRITY] = digest(data)
    (root / MANIFEST).write_text(json.dumps(data, indent=1) + "\n")


def file_table(root: Path, rels: list[str], cached: tuple[str, ...] = ()) -> dict[str, FileInfo]:
    """Size and SHA-256 of each file; the ``cached`` ones (hard-linked base data) through the hash cache."""
    return {rel: FileInfo(sha256_cached(root / rel) if rel in cached else sha256_file(root / rel),
                          (root / rel).stat().st_size) for rel in rels}
