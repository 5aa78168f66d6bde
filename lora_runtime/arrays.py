"""Arrays from the user's .npz files, read without pickle, every failure one line naming the file."""

from __future__ import annotations

import os
import zipfile

import numpy as np

from lora_runtime.errors import InputError


def read_npz(path: str | os.PathLike[str], what: str = "arrays") -> dict[str, np.ndarray]:
    """Every array of an .npz (``np.savez``); ``what`` says what the file was meant to hold, for messages."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read {what} ({e.strerror or e})") from e
    if size == 0:
        raise InputError(f"{path}: empty file; expected {what} as an .npz (numpy.savez)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: cannot read {what} as an .npz ({e})") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: a single array (.npy); expected {what} as an .npz of named arrays "
                         "(numpy.savez(path, name=array, ...))")
    try:
        with loaded as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: cannot read {what} as an .npz ({e})") from e
