"""The setup cache (issue 14 item 4): per-layer Grams, K's eigendecomposition, the KFAC factor
eigendecompositions and the Woodbury Cholesky factors, computed once per checkpoint (and damping)
and kept beside the capture file, so that ``errors``, ``spectra``, ``interactions`` and the damping
sweep — and a second run of any — share them.

The cache is a sidecar folder; the capture file itself is never written::

    <file>.cache/                      (--cache-dir DIR: DIR/<file name>-<8 hex of its path>.cache/)
        <checkpoint>-<8 hex>/          one folder per checkpoint (its name made path-safe)
            grams.<precision>.h5       grams/<i>  [N, N]                 the per-layer Grams K_i
            gram_eigh.<precision>.h5   mu [N], W [N, N]                  ascending eigenpairs of K = Σ K_i
            kfac_eigh.<precision>.h5   <i>/sA [d_in'], <i>/QA [d_in', d_in'], <i>/sG [d_out], <i>/QG [d_out, d_out]
            diagonal.<precision>.h5    <i> [p_i]                          diag(U_iU_iᵀ), the DIAGONAL method's
            ekfac_moments.<precision>.h5  <i> [d_out, d_in']              EKFAC's re-fitted eigenvalues, each with
                                                                          the attribute basis = the CRC-32s of the
                                                                          Q_A and Q_G (kfac_eigh) they belong to
            woodbury-<λ>.<precision>.h5  L [N, N]                        Cholesky factor of λI + K (λ as float.hex)

Every file has the attributes ``format = "fisherlab-cache"``, ``cache_version``, ``checkpoint``,
``fingerprint`` (:meth:`fisherlab.store.CaptureFile.fingerprint`: a digest of the checkpoint's
stored CRC-32s, so a changed checkpoint invalidates its entries), ``precision``, ``N`` (and
``damping`` for a Woodbury factor); every dataset is float64 with a ``crc32`` attribute (zlib
CRC-32 of its bytes). Only numbers are read back (never a pickle): a file whose fingerprint,
version or shapes disagree is stale, one whose checksum fails is corrupted; either is ignored,
recomputed and replaced. Files are written to a temporary name in the same folder and published
with ``os.replace`` (readers see the old file or the new one, never half of one; concurrent
writers each publish a complete file), and never modified in place.

This module sits between the store and the Jacobian core: it knows the Jacobian only through
``seed_setup`` / ``computed_setup`` (:class:`fisherlab.jacobian.Jacobian`).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from .errors import FisherlabError

__all__ = ["CACHE_VERSION", "FORMAT", "SetupCache", "CacheEntry", "cache_folder"]

FORMAT = "fisherlab-cache"
CACHE_VERSION = 1
ITEMS = ("grams", "gram_eigh", "kfac_eigh", "diagonal", "ekfac_moments")
"""The λ-independent items of an entry (the Woodbury factors are one file per λ)."""


def _crc(arr: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast("B")) & 0xFFFFFFFF


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:64] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def cache_folder(capture: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The sidecar folder of a capture file: ``<file>.cache`` beside it, or under ``cache_dir``
    (named after the file and a digest of its absolute path, so that two files never share one)."""
    path = Path(capture)
    if cache_dir is None:
        return path.with_name(path.name + ".cache")
    tag = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    return Path(cache_dir) / f"{path.name}-{tag}.cache"


class _Bad(Exception):
    """An unusable cache file (stale or corrupted): ignored and rebuilt."""


@dataclass
class CacheEntry:
    """The cached setup of one checkpoint, as computed in ``precision``.

    :meth:`seed` fills a Jacobian with what is cached, :meth:`woodbury` returns a cached Cholesky
    factor, :meth:`save` writes what was computed since. ``loaded``, ``written`` and ``notes``
    (stale or corrupted files found, and why) report what happened.
    """

    folder: Path
    checkpoint: str
    fingerprint: str
    precision: str = "float64"
    loaded: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    _have: dict[str, Any] = field(default_factory=dict)
    _crcs: dict[str, dict[str, int]] = field(default_factory=dict)
    """item → dataset → CRC-32, of the files read or written (the EKFAC moments' basis key)."""

    # ---- files -----------------------------------------------------------------------------
    def _file(self, item: str) -> Path:
        return self.folder / f"{item}.{self.precision}.h5"

    def _read(self, item: str, N: int) -> dict[str, np.ndarray] | None:
        """The datasets of ``item`` (verified), or ``None`` (missing, stale or corrupted: noted)."""
        path = self._file(item)
        if not path.is_file():
            return None
        try:
            with h5py.File(path, "r") as f:
                attrs = {k: f.attrs.get(k) for k in ("format", "cache_version", "fingerprint", "precision", "N", "checkpoint")}
                if attrs["format"] != FORMAT or attrs["cache_version"] != CACHE_VERSION:
                    raise _Bad("not a fisherlab cache file of this version")
                if attrs["fingerprint"] != self.fingerprint or attrs["checkpoint"] != self.checkpoint:
                    raise _Bad("stale: the checkpoint changed since it was written")
                if attrs["precision"] != self.precision or attrs["N"] != N:
                    raise _Bad("stale: written for another precision or N")
                out: dict[str, np.ndarray] = {}
                crcs: dict[str, int] = {}

                def visit(name: str, obj: Any) -> None:
                    if isinstance(obj, h5py.Dataset):
                        if obj.dtype != np.float64:
                            raise _Bad(f"dataset '{name}' is {obj.dtype}, not float64")
                        arr = np.asarray(obj[()])
                        stored = obj.attrs.get("crc32")
                        if stored is None or int(stored) != _crc(arr):
                            raise _Bad(f"checksum mismatch in dataset '{name}'")
                        out[name] = arr
                        crcs[name] = int(stored)
                        if "basis" in obj.attrs:
                            out[name + "@basis"] = np.asarray(str(obj.attrs["basis"]))

                f.visititems(visit)
                self._crcs[item] = crcs
                return out
        except _Bad as err:
            self.notes.append(f"{path.name}: {err}; recomputed")
        except Exception as err:  # not HDF5, truncated, unreadable
            self.notes.append(f"{path.name}: unreadable ({type(err).__name__}); recomputed")
        return None

    def _write(self, item: str, arrays: dict[str, Tensor], N: int, *, basis: dict[str, str] | None = None, **attrs: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._file(item)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        try:
            with h5py.File(tmp, "w", libver=("earliest", "v108")) as f:
                meta = dict(format=FORMAT, cache_version=CACHE_VERSION, fingerprint=self.fingerprint,
                            checkpoint=self.checkpoint, precision=self.precision, N=N, **attrs)
                for k, v in meta.items():
                    f.attrs[k] = v
                crcs: dict[str, int] = {}
                for name, t in arrays.items():
                    arr = np.ascontiguousarray(t.detach().to("cpu", torch.float64).numpy())
                    ds = f.create_dataset(name, data=arr)
                    crcs[name] = _crc(arr)
                    ds.attrs["crc32"] = np.int64(crcs[name])
                    if basis is not None and name in basis:
                        ds.attrs["basis"] = basis[name]
            os.replace(tmp, path)
            self._crcs[item] = crcs
            self.written.append(item)
        except OSError as err:  # a read-only or full disk: the analysis goes on without the cache
            self.notes.append(f"{path.name}: not written ({err.strerror or type(err).__name__})")
        finally:
            if tmp.exists():
                tmp.unlink()

    # ---- the Jacobian's setup ------------------------------------------------------------------
    def seed(self, jac: Any) -> list[str]:
        """Seed ``jac`` (a :class:`fisherlab.jacobian.Jacobian`) with the cached items; returns
        the items found."""
        t0 = time.perf_counter()
        N, layers = jac.N, jac.layers
        grams: list[Tensor | None] | None = None
        eigs: list[tuple | None] | None = None
        gram_eigh = None
        found: list[str] = []
        data = self._read("grams", N)
        if data is not None:
            grams = [torch.from_numpy(data[f"grams/{i}"]) if f"grams/{i}" in data else None for i in range(len(layers))]
            if any(K is not None and tuple(K.shape) != (N, N) for K in grams):
                self.notes.append("grams: wrong shapes; recomputed")
                grams = None
            else:
                found.append("grams")
        data = self._read("gram_eigh", N)
        if data is not None and {"mu", "W"} <= set(data) and data["mu"].shape == (N,) and data["W"].shape == (N, N):
            gram_eigh = (torch.from_numpy(data["mu"]), torch.from_numpy(data["W"]))
            found.append("gram_eigh")
        data = self._read("kfac_eigh", N)
        if data is not None:
            eigs = []
            for i, lj in enumerate(layers):
                keys = [f"{i}/{k}" for k in ("sA", "QA", "sG", "QG")]
                if all(k in data for k in keys):
                    d_in, d_out = lj.spec.d_in_bar, lj.spec.d_out
                    want = [(d_in,), (d_in, d_in), (d_out,), (d_out, d_out)]
                    if [data[k].shape for k in keys] == want:
                        eigs.append(tuple(torch.from_numpy(data[k]) for k in keys))
                        continue
                eigs.append(None)
            if any(e is not None for e in eigs):
                found.append("kfac_eigh")
        diagonals = self._per_layer("diagonal", N, [(lj.spec.numel,) for lj in layers], found)
        # EKFAC's moments only in the very basis seeded now (an eigenbasis is not unique)
        seeded = [e is not None for e in eigs] if eigs is not None else [False] * len(layers)
        moments = self._per_layer("ekfac_moments", N, [(lj.spec.d_out, lj.spec.d_in_bar) for lj in layers], found,
                                  basis=[self._basis_key(i) if ok else None for i, ok in enumerate(seeded)])
        jac.seed_setup(grams=grams, gram_eigh=gram_eigh, kfac_eigh=eigs, diagonals=diagonals, ekfac_moments=moments)
        self._have = {"grams": sum(K is not None for K in grams or []), "gram_eigh": gram_eigh is not None,
                      "kfac_eigh": sum(e is not None for e in eigs or []),
                      "diagonal": sum(d is not None for d in diagonals or []),
                      "ekfac_moments": sum(m is not None for m in moments or [])}
        self.loaded += found
        self.seconds += time.perf_counter() - t0
        return found

    def _per_layer(self, item: str, N: int, shapes: list[tuple[int, ...]], found: list[str],
                   basis: list[str | None] | None = None) -> list[Tensor | None] | None:
        """One array per layer (dataset ``<i>``) of a per-layer item, ``None`` for a layer without
        (or of the wrong shape, or, with ``basis``, computed in another eigenbasis)."""
        data = self._read(item, N)
        if data is None:
            return None
        out: list[Tensor | None] = []
        for i, shape in enumerate(shapes):
            arr = data.get(str(i))
            ok = arr is not None and arr.shape == shape
            if ok and basis is not None:
                tag = data.get(f"{i}@basis")
                ok = basis[i] is not None and tag is not None and str(tag) == basis[i]
            out.append(torch.from_numpy(arr) if ok else None)  # type: ignore[arg-type]
        if any(t is not None for t in out):
            found.append(item)
        return out

    def _basis_key(self, i: int, eigh: tuple | None = None) -> str:
        """The CRC-32s of layer ``i``'s Q_A and Q_G as stored in ``kfac_eigh`` (read or written
        now), or of ``eigh`` itself when that file was neither."""
        crcs = self._crcs.get("kfac_eigh", {})
        if f"{i}/QA" in crcs and f"{i}/QG" in crcs:
            return f"{crcs[f'{i}/QA']:08x}-{crcs[f'{i}/QG']:08x}"
        assert eigh is not None
        QA, QG = (np.ascontiguousarray(t.detach().to("cpu", torch.float64).numpy()) for t in (eigh[1], eigh[3]))
        return f"{_crc(QA):08x}-{_crc(QG):08x}"

    def woodbury(self, damping: float, N: int) -> Tensor | None:
        """The cached Cholesky factor ``L [N, N]`` of ``λI + K`` at ``damping``, or ``None``."""
        t0 = time.perf_counter()
        data = self._read(self._woodbury_item(damping), N)
        self.seconds += time.perf_counter() - t0
        if data is None or "L" not in data or data["L"].shape != (N, N):
            return None
        self.loaded.append("woodbury")
        self._have[self._woodbury_item(damping)] = True
        return torch.from_numpy(data["L"])

    @staticmethod
    def _woodbury_item(damping: float) -> str:
        return "woodbury-" + float(damping).hex().replace("+", "")

    def save(self, jac: Any, *, woodbury: tuple[float, Tensor] | None = None) -> list[str]:
        """Write what ``jac`` computed beyond what was cached (and the Woodbury factor
        ``(λ, L)``, when new); returns the items written."""
        t0 = time.perf_counter()
        before = len(self.written)
        N = jac.N
        done = jac.computed_setup()
        grams = done.get("grams") or []
        n = sum(K is not None for K in grams)
        if n > self._have.get("grams", 0):
            self._write("grams", {f"grams/{i}": K for i, K in enumerate(grams) if K is not None}, N)
            self._have["grams"] = n
        if "gram_eigh" in done and not self._have.get("gram_eigh"):
            mu, W = done["gram_eigh"]  # type: ignore[misc]
            self._write("gram_eigh", {"mu": mu, "W": W}, N)
            self._have["gram_eigh"] = True
        eigs = done.get("kfac_eigh") or []
        n = sum(e is not None for e in eigs)
        if n > self._have.get("kfac_eigh", 0):
            arrays = {f"{i}/{k}": t for i, e in enumerate(eigs) if e is not None for k, t in zip(("sA", "QA", "sG", "QG"), e)}
            self._write("kfac_eigh", arrays, N)
            self._have["kfac_eigh"] = n
        diagonals = done.get("diagonals") or []
        n = sum(d is not None for d in diagonals)
        if n > self._have.get("diagonal", 0):
            self._write("diagonal", {str(i): d for i, d in enumerate(diagonals) if d is not None}, N)
            self._have["diagonal"] = n
        moments = done.get("ekfac_moments") or []
        n = sum(m is not None for m in moments)
        if n > self._have.get("ekfac_moments", 0):
            keep = {str(i): m for i, m in enumerate(moments) if m is not None and eigs[i] is not None}
            self._write("ekfac_moments", keep, N, basis={k: self._basis_key(int(k), eigs[int(k)]) for k in keep})
            self._have["ekfac_moments"] = n
        if woodbury is not None:
            lam, L = woodbury
            item = self._woodbury_item(lam)
            if not self._have.get(item):
                self._write(item, {"L": L}, N, damping=float(lam))
                self._have[item] = True
        self.seconds += time.perf_counter() - t0
        return self.written[before:]

    def summary(self) -> str:
        """One line: what was read, written, and rebuilt."""
        parts = []
        if self.loaded:
            parts.append("read " + ", ".join(dict.fromkeys(self.loaded)))
        if self.written:
            parts.append("wrote " + ", ".join(dict.fromkeys(w.split("-")[0] for w in self.written)))
        parts += self.notes
        return "; ".join(parts) if parts else "nothing cached"


class SetupCache:
    """The setup cache of one capture file (module docstring: layout and rules).

    Args:
        capture: the capture file.
        cache_dir: where the sidecar folder goes (default: beside the file).
    """

    def __init__(self, capture: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> None:
        self.capture = Path(capture)
        self.folder = cache_folder(self.capture, cache_dir)

    def entry(self, checkpoint: str, fingerprint: str, precision: str = "float64") -> CacheEntry:
        """The entry of ``checkpoint`` whose data digest is ``fingerprint``."""
        if not fingerprint:
            raise FisherlabError(f"{self.capture}: checkpoint '{checkpoint}' has no fingerprint to key the cache by")
        return CacheEntry(self.folder / _safe(checkpoint), checkpoint, fingerprint, precision)

    def __repr__(self) -> str:
        return f"<SetupCache {self.folder}>"
