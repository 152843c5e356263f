"""Result folders: refuse another spec's folder, write files atomically."""

from __future__ import annotations

import json
import os

import numpy as np

from .errors import OutputError

SPEC_FILE = "spec.json"
RESULT_FILE = "result.json"
EIGVEC_FILE = "eigvec.npy"


def claim_out_dir(path: str, spec_dict: dict, spec_hash: str) -> None:
    """Create ``path`` for this spec, or accept it if it already belongs to the same spec.

    A non-empty folder that belongs to another spec, or to nothing of ours, is refused and
    left untouched.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"--out {path!r} exists and is not a folder")
    if os.path.isdir(path) and os.listdir(path):
        owner = _read_spec_hash(path)
        if owner is None:
            raise OutputError(f"--out {path!r} is not empty and holds no ntkdist spec; "
                              "choose an empty or new folder")
        if owner != spec_hash:
            raise OutputError(f"--out {path!r} holds results of another spec "
                              f"({owner[:12]} ≠ {spec_hash[:12]}); choose another folder")
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --out {path!r}: {exc.strerror}") from None
    write_json(os.path.join(path, SPEC_FILE), {"spec": spec_dict, "spec_hash": spec_hash})


def _read_spec_hash(path: str) -> str | None:
    try:
        with open(os.path.join(path, SPEC_FILE)) as f:
            value = json.load(f).get("spec_hash")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def write_npy(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)
