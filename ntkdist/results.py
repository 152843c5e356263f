"""Result folders (refuse another spec's folder, write files atomically) and the result
schema, :class:`RunResult`, defined once."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from .errors import OutputError, os_reason
from .locks import LOCK_FILE, folder_lock

SPEC_FILE = "spec.json"
RESULT_FILE = "result.json"
EIGVEC_FILE = "eigvec.npy"


def existing_parent(path: str) -> str:
    """``path`` itself where it exists, else its nearest existing parent folder (where a
    folder to be made would live: its disk, its permissions)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def claim_out_dir(path: str, spec_dict: dict, spec_hash: str) -> str | None:
    """Create ``path`` for this spec, or accept it if it already belongs to the same spec.

    A non-empty folder that belongs to another spec, or to nothing of ours, is refused and
    left untouched. Returns what this call did, for :func:`release_out_dir`: "created" (a new
    folder), "filled" (an empty folder now holds the spec) or None (already this spec's).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"--out {path!r} exists and is not a folder")
    if os.path.isdir(path) and set(os.listdir(path)) - {LOCK_FILE}:  # a lock is not content
        owner = _read_spec_hash(path)
        if owner is None:
            raise OutputError(f"--out {path!r} is not empty and holds no ntkdist spec; "
                              "choose an empty or new folder")
        if owner != spec_hash:
            raise OutputError(f"--out {path!r} holds results of another spec "
                              f"({owner[:12]} ≠ {spec_hash[:12]}"
                              f"{_differences(path, spec_dict)}); choose another folder")
        return None
    claimed = "filled" if os.path.isdir(path) else "created"
    try:
        os.makedirs(path, exist_ok=True)
        write_json(os.path.join(path, SPEC_FILE), {"spec": spec_dict, "spec_hash": spec_hash})
    except OSError as exc:
        with contextlib.suppress(OSError):  # leave no half-claimed folder behind
            os.remove(os.path.join(path, SPEC_FILE) + ".tmp")
        raise OutputError(f"cannot write --out {path!r}: {exc.strerror or exc}") from None
    return claimed


def release_out_dir(path: str, claimed: str | None) -> None:
    """Undo :func:`claim_out_dir` after a run that failed before writing anything else: a
    folder holding only this run's ``spec.json`` would otherwise refuse the corrected rerun
    (another spec). Folders with anything more (a checkpoint to resume from) are kept."""
    if claimed is None:
        return
    try:
        if set(os.listdir(path)) - {SPEC_FILE}:
            return
        os.remove(os.path.join(path, SPEC_FILE))
        if claimed == "created":
            os.rmdir(path)
    except OSError:
        pass


class OutClaim:
    """A run's hold on its ``--out`` folder, as a context manager: calling it claims the
    folder (:func:`claim_out_dir`, once, when the run is about to write) and takes the
    folder's lock (:func:`ntkdist.locks.folder_lock`), so a second run on the same folder
    gets one line naming the first instead of sharing its checkpoint and factor. The lock
    ends with the block (or the process); a block that fails undoes the claim
    (:func:`release_out_dir`)."""

    def __init__(self, path: str, spec_dict: dict, spec_hash: str):
        self.path, self.spec_dict, self.spec_hash = path, spec_dict, spec_hash
        self._claimed: list = []
        self._lock = None

    def __call__(self) -> None:
        if self._claimed:
            return
        path = self.path
        if os.path.exists(path) and not os.path.isdir(path):
            raise OutputError(f"--out {path!r} exists and is not a folder")
        created = not os.path.isdir(path)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write --out {path!r}: {os_reason(exc)}") from None
        lock = folder_lock(path, f"--out {path!r}", "written", OutputError)
        try:  # the lock first: only its holder reads and writes the folder's spec
            lock.__enter__()
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise
        self._lock = lock
        try:
            claimed = claim_out_dir(path, self.spec_dict, self.spec_hash)
        except BaseException:
            self._unlock()
            if created:  # nothing of the refused run stays behind
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise
        self._claimed.append("created" if created and claimed else claimed)

    def _unlock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.__exit__(None, None, None)

    def __enter__(self) -> OutClaim:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self._unlock()
        if kind is not None and self._claimed:
            release_out_dir(self.path, self._claimed[0])


def _differences(path: str, spec_dict: dict) -> str:
    """'; differs in depth (3 ≠ 4), …' between a folder's recorded spec and ``spec_dict``."""
    from .spec import spec_differences

    try:
        with open(os.path.join(path, SPEC_FILE)) as f:
            old = json.load(f).get("spec")
    except (OSError, ValueError, AttributeError):
        return ""
    diffs = spec_differences(old, spec_dict)
    return "; differs in " + ", ".join(diffs) if diffs else ""


def _read_spec_hash(path: str) -> str | None:
    try:
        with open(os.path.join(path, SPEC_FILE)) as f:
            value = json.load(f).get("spec_hash")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _finite(obj):
    """``obj`` with every non-finite float replaced by None (JSON has no Infinity or NaN)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def write_json(path: str, obj: dict) -> None:
    """Write ``obj`` as strict JSON (non-finite numbers as null), atomically."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_finite(obj), f, indent=2, sort_keys=False, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader sees the old file or the new one)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_npy(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@dataclass
class RunResult:
    """What a run or solve job returns, and what ``result.json`` holds (its fields, in this
    order; documented one by one in docs/results.md). ``result["lambda_min"]`` reads a
    field as from the JSON dict."""

    # The answer and how sure it is
    lambda_min: float | None
    status: str  # certified | exact | below_resolution | missed | not_converged
    converged: bool
    residual_norm: float
    relative_accuracy: float
    relative_accuracy_residual: float
    relative_accuracy_kato_temple: float | None
    abs_error_bound: float
    resolution: float
    lambda_min_interval: list
    lambda_min_computed: float
    lambda_min_lower_certified: float | None
    lambda_min_upper_certified: float | None
    certify: dict | None
    smallest_proved: bool
    rounding_limited: bool
    # How it was solved
    method: str
    block: int | None
    notes: list
    k: int
    eigenvalues: list
    eigenvalues_computed: list
    residual_norms: list
    gaps: list
    accuracy: dict
    iterations: int | None
    passes: int | None
    precision: str
    phases: list | None
    matvecs: int | None
    bytes_read: int | None
    resumed_from_checkpoint: dict | None
    passes_total: int | None
    operator: str
    device: str
    gpus: list | None
    operator_memory: dict | None
    preconditioner: dict | None
    solver_seconds: float
    # The problem
    n: int
    d: int
    depth: int
    kernel: str
    normalization: str
    data: str
    seed: int | None
    input_sha256: str | None
    row_norm_range: list
    duplicate_rows: int
    parallel_rows: int
    singular_expected: bool
    singular_reason: str | None
    dedupe: bool
    n_input: int
    # The theory beside the measurement
    bounds: dict
    # Provenance
    wall_seconds: float
    ntkdist_version: str
    store: str | None
    spec: dict
    spec_hash: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __getitem__(self, name: str):
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)

    def __contains__(self, name: str) -> bool:
        return name in self.__dataclass_fields__

    def keys(self):
        return list(self.__dataclass_fields__)

    def get(self, name: str, default=None):
        return getattr(self, name, default) if name in self.__dataclass_fields__ else default


def write_result(out: str, result: RunResult, vectors) -> None:
    """``out/eigvec.npy`` and ``out/result.json``, each written atomically; a one-line
    OutputError (with the computed λ_min, so it is not lost) if the disk refuses."""
    try:
        write_npy(os.path.join(out, EIGVEC_FILE), vectors)
        write_json(os.path.join(out, RESULT_FILE), result.to_dict())
    except OSError as exc:
        reason = exc.strerror or f"{exc}; is the disk full?"
        raise OutputError(f"cannot write the results into {out!r} ({reason}); computed λ_min "
                          f"= {result.lambda_min_computed!r} ({result.status})") from None
