"""HDF5 store for captures, schema v2 (reads v1; the only module that imports h5py).

One file per run, one group per checkpoint, one subgroup per layer::

    /                              attrs: format="fisherlab", schema_version=2, fisherlab_version,
                                          created, layout (JSON), model (JSON), loss, fisher,
                                          n_vectors (K), batch_size (B)
    /checkpoints/<name>            attrs: name, step, batch_indices, seed, loss_value, loss, fisher,
                                          batch_size, n_vectors, dtype, meta, layers (the layer
                                          table), created, nbytes, complete=True (written last);
                                          v2: sample (JSON {of, batch, draw, batches, draws}) for
                                          one of several batches / draws of a checkpoint
        grad        [p]            ∇h (2.10), fisherlab order
        targets     [B] | [B, d_y] the true targets
        sampled     [K, B, ...]    the drawn targets (mc only)
        layers/<i>                 attrs: name, kind, storage, positions
            a  [B, T, d_in']       ā       ┐ storage "factored"
            g  [B, K, T, d_out]    g       ┘
            J  [N, p_i]            dense per-example gradients (storage "dense"), N = B·K
            A  [d_in', d_in']      KFAC factors of a dense layer (J no longer determines them)
            G  [d_out, d_out]
    /staging/<name>                a checkpoint being written (same layout, no ``complete``)

Every dataset carries ``crc32`` (zlib CRC-32 of its C-order bytes). The example axis is the
chunking axis of ``a``, ``g`` and ``J`` (≈1 MiB chunks). Metadata are JSON strings or plain
scalars, never pickles.

**Crash safety.** A checkpoint is written into ``/staging/<name>`` (created and flushed first,
so a killed writer leaves a visible "incomplete" entry), checksummed, flushed and fsync'd, and
only then moved to ``/checkpoints/<name>``; ``complete=True`` is set after the move and the file
is flushed and fsync'd again. While the bulk data are written, no HDF5 object reachable from an
earlier checkpoint is modified, so SIGKILL at that moment leaves every earlier checkpoint intact
(tests/test_store.py kills a real writer there). The first checkpoint of a new file is written to
``<file>.partial`` and renamed into place once committed. The files use the HDF5 1.8 format
(``libver=("earliest", "v108")``): the newer superblock of ``libver="latest"`` records "open for
write" and refuses to open after a crash until ``h5clear`` is run. HDF5 itself gives no formal
crash guarantee outside SWMR; the two short commit steps (create the staging link, move it) each
rewrite a few small metadata blocks and are the remaining window: when a kill there leaves
staging links HDF5 can neither delete nor move, the next append moves the whole ``/staging``
aside (``/.stale-staging-<n>``) and starts a fresh one. A new file's ``<file>.partial`` is held
under an exclusive ``flock`` and published with ``os.link`` (never replacing a file): a concurrent
creator gets a one-line error, and one that loses the publish appends instead. A write checks the
free disk space first; disk full, read-only and permission errors are one line naming the cause.

**Trust.** The store reads and writes only what it writes itself: every link under ``/`` is a
hard link to an object of this file, linked once (no soft or external links, no aliases);
datasets are contiguous or chunked in this file (no virtual datasets, no external storage),
with no filter but gzip or lzf, of plain number types; a declared dataset must be fully
allocated in the file and fit the available memory before it is read. Attributes are typed and
bounded (JSON size and depth), and the root, every checkpoint and every layer group carry
``attrs_crc32``, a CRC-32 of their other attributes (``complete`` apart): a changed attribute is
an error, not a silent load. A committed checkpoint whose metadata cannot be read is reported
``damaged``, not incomplete.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import h5py
import numpy as np
import torch
from torch import Tensor

from .capturing.record import Capture, FisherMode, LayerCapture, Storage, dataset_shapes
from ._system import available_memory
from .errors import NonFiniteError, StoreError
from .layout import LayerSpec, Layout

__all__ = [
    "SCHEMA_VERSION",
    "CaptureFile",
    "CheckpointInfo",
    "DatasetInfo",
    "LayerInfo",
    "file_info",
    "list_checkpoints",
    "select_checkpoints",
    "load",
    "save",
]

FORMAT = "fisherlab"
SCHEMA_VERSION = 2
"""v2 (this version) adds the checkpoint attribute ``sample``: several independent batches and
Monte-Carlo draws of one training checkpoint, each stored as a checkpoint of its own. v1 files
are read as before, and appending to one keeps it v1 (the sample is then only in ``meta``)."""
COMPRESSIONS = (None, "lzf", "gzip")
_LIBVER = ("earliest", "v108")
_CHUNK_BYTES = 1 << 20
_DS_ORDER = ("a", "g", "J", "A", "G")

# Test hook: called as ``_WRITE_HOOK(checkpoint, stage)`` while a checkpoint is being written
# (``stage`` = "staged", "<i>/<dataset>" after each layer dataset, "before-commit", "moved" (in
# /checkpoints, not yet complete), "completed" (flag set, not yet flushed), "committed"). tests/test_store.py uses it to stop a writer at a known moment and SIGKILL it.
_WRITE_HOOK: Callable[[str, str], None] | None = None


# --------------------------------------------------------------------------------------------
# descriptions returned to callers (inspect, operators)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """One stored array: logical shape and dtype, chunking, filter, sizes in bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...] | None
    compression: str | None
    nbytes: int
    stored_bytes: int


@dataclass(frozen=True)
class LayerInfo:
    """One row of a checkpoint's layer table, with its datasets (when readable)."""

    index: int
    name: str
    kind: str
    storage: str
    positions: int
    shapes: dict[str, list[int]]
    datasets: tuple[DatasetInfo, ...] = ()


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint of a file: complete (under ``/checkpoints``), not (staging, killed writer), or
    ``damaged`` (committed, but its metadata cannot be read: ``complete`` is then ``False``)."""

    name: str
    complete: bool
    step: int | None = None
    batch_indices: list[int] | None = None
    seed: int | None = None
    loss_value: float | None = None
    loss: str | None = None
    fisher: str | None = None
    batch_size: int | None = None
    n_vectors: int | None = None
    dtype: str | None = None
    created: str | None = None
    layers: tuple[LayerInfo, ...] = ()
    datasets: tuple[DatasetInfo, ...] = ()
    nbytes: int = 0
    stored_bytes: int = 0
    status: str = ""
    damaged: bool = False
    sample: dict | None = None
    """v2: ``{"of": checkpoint, "batch": i, "draw": j, "batches": n, "draws": d}`` when this is one
    sample of several (``fisherlab capture --batches/--draws``), else ``None``."""


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
    from ._version import __version__

    return __version__


def _jdump(x: Any) -> str:
    return json.dumps(x, sort_keys=True, allow_nan=False)


def _attr(obj: Any, key: str, default: Any = None) -> Any:
    v = obj.attrs.get(key, default)
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def _jattr(obj: Any, key: str, default: Any = None, where: str | None = None) -> Any:
    """A JSON attribute, bounded in size and nesting depth; bad JSON is a one-line StoreError."""
    v = _attr(obj, key, None)
    if v is None:
        return default
    at = f"{where}: " if where else ""
    if not isinstance(v, str):
        raise StoreError(f"{at}attribute '{key}' is a {type(v).__name__}, not a JSON string; the file is corrupted")
    if len(v) > _MAX_JSON_CHARS or not _json_depth_ok(v):
        raise StoreError(f"{at}attribute '{key}' is larger or more deeply nested than fisherlab writes; the file is corrupted")
    try:
        return json.loads(v)
    except (ValueError, RecursionError) as err:
        raise StoreError(f"{at}attribute '{key}' is not valid JSON ({_first_line(err)}); the file is corrupted") from None


def _typed(obj: Any, key: str, kinds: tuple, where: str, *, json_: bool = False, optional: bool = False) -> Any:
    """An attribute of one of the Python types ``kinds`` (bool is never an int here)."""
    v = _jattr(obj, key, None, where) if json_ else _attr(obj, key)
    if v is None and optional:
        return None
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise StoreError(
            f"{where}: attribute '{key}' is {type(v).__name__} {v!r:.40}, expected "
            f"{' or '.join(k.__name__ for k in kinds)}; the file is corrupted"
        )
    return v


def _crc(arr: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast("B")) & 0xFFFFFFFF


def _to_numpy(t: Tensor, dtype: torch.dtype | None) -> np.ndarray:
    t = t.detach().to("cpu")
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    if t.dtype == torch.bfloat16:
        raise StoreError("cannot store bfloat16 arrays in HDF5; pass dtype=torch.float32")
    return t.contiguous().numpy()


def _count_non_finite(arr: np.ndarray) -> int:
    """Number of NaN/Inf in a float array (0 quickly when its sum is finite)."""
    if arr.dtype.kind != "f" or arr.size == 0:
        return 0
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(arr.sum()):  # NaN/Inf propagate into the sum; an overflow only costs the exact count
            return 0
    return int(arr.size - np.count_nonzero(np.isfinite(arr)))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _first_line(err: BaseException) -> str:
    s = str(err).strip()
    return s.splitlines()[0] if s else type(err).__name__


def _where(path: Path, checkpoint: str | None = None, layer: int | None = None, name: str | None = None) -> str:
    s = f"{path}"
    if checkpoint is not None:
        s += f": checkpoint '{checkpoint}'"
    if layer is not None:
        s += f", layer {layer}" + (f" '{name}'" if name else "")
    return s


def _expected_shapes(spec: LayerSpec, storage: str, B: int, K: int, T: int, kfac: bool = False) -> dict[str, list[int]]:
    """Dataset shapes of a layer: the record's one table (:func:`fisherlab.capturing.record.dataset_shapes`)."""
    if storage not in (Storage.DENSE.value, Storage.FACTORED.value):
        raise ValueError(f"unknown storage {storage!r}")
    return dataset_shapes(spec, storage, B, K, T, kfac)


def _layer_arrays(lc: LayerCapture) -> dict[str, Tensor | None]:
    return lc.arrays()  # type: ignore[return-value]


def _layer_table(capture: Capture) -> list[dict]:
    rows = []
    for i, lc in enumerate(capture.layers):
        storage = lc.storage.value
        rows.append(
            {
                "index": i,
                "name": lc.spec.name,
                "kind": lc.spec.kind.value,
                "storage": storage,
                "positions": lc.positions,
                "shapes": _expected_shapes(
                    lc.spec, storage, capture.B, capture.K, lc.positions, kfac=lc.dense is not None and lc.A is not None
                ),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# trust nothing the store did not write: links, storage, filters, sizes, attributes
# --------------------------------------------------------------------------------------------

_FILTERS = {h5py.h5z.FILTER_DEFLATE: "gzip", 32000: "lzf"}  # the only filters save() sets
_ROOT_MEMBERS = ("checkpoints", "staging")
_CKPT_MEMBERS = ("grad", "targets", "sampled", "layers")
_MAX_OBJECTS = 1_000_000
_MAX_JSON_CHARS = 64 << 20
_MAX_JSON_DEPTH = 32
_STALE = ".stale-"


class _Unreadable(StoreError):
    """Metadata that cannot be read (a killed writer, a damaged block), as opposed to a refusal."""


class _Refused(StoreError):
    """Something save() never writes (links out of the file, foreign storage): refused outright."""


def _link_type(grp: Any, name: str) -> int:
    return grp.id.links.get_info(name.encode()).type


def _refuse_link(path: Path, where: str, ltype: int) -> None:
    kind = {h5py.h5l.TYPE_SOFT: "a soft link", h5py.h5l.TYPE_EXTERNAL: "an external link"}.get(ltype, "a user-defined link")
    raise _Refused(
        f"{path}: {where} is {kind}, not an object of this file; fisherlab files hold only hard links "
        "(refusing to follow it; was the file edited by another tool?)"
    )


def _check_links(path: Path, grp: Any, prefix: str) -> list[str]:
    """Names of ``grp``'s members, every one a hard link (else a one-line :class:`StoreError`)."""
    names = _safe_keys(grp)
    for n in names:
        try:
            t = _link_type(grp, n)
        except Exception as err:
            raise _Unreadable(f"{path}: cannot read the link {prefix}/{n} ({_first_line(err)}); the file is corrupted") from None
        if t != h5py.h5l.TYPE_HARD:
            _refuse_link(path, f"{prefix}/{n}", t)
    return names


def _refcount(obj: Any) -> int:
    return int(h5py.h5o.get_info(obj.id).rc)


def _audit_dataset(path: Path, ds: Any, where: str) -> None:
    """A dataset save() could have written: contiguous or chunked storage inside this file, no
    external or virtual storage, only the gzip/lzf filter, a plain numeric dtype."""
    try:
        plist = ds.id.get_create_plist()
        layout = plist.get_layout()
        external = plist.get_external_count()
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        kind = ds.dtype.kind
        vlen = h5py.check_dtype(vlen=ds.dtype) is not None
    except StoreError:
        raise
    except Exception as err:
        raise _Unreadable(f"{path}: cannot read the dataset {where} ({_first_line(err)}); the file is corrupted") from None
    if layout == h5py.h5d.VIRTUAL:
        raise _Refused(f"{path}: {where} is a virtual dataset (its data live in other files); refusing to read it")
    if external:
        raise _Refused(f"{path}: {where} keeps its data in external files; refusing to read it")
    if layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED):
        raise _Refused(f"{path}: {where} has a storage layout fisherlab never writes; the file is corrupted")
    bad = [f for f in filters if f not in _FILTERS]
    if bad or len(filters) > 1:
        raise _Refused(f"{path}: {where} uses HDF5 filter(s) {filters} that fisherlab never sets; refusing to read it")
    if kind not in "biuf" or vlen or ds.dtype.names is not None or ds.dtype.subdtype is not None:
        raise _Refused(f"{path}: {where} has dtype {ds.dtype}, not a plain number type; the file is corrupted")


def _audit_tree(path: Path, grp: Any, prefix: str, depth: int, budget: list[int]) -> None:
    """Every member of ``grp``, recursively: hard links only, each object linked once (no object
    reachable from two places, no cycles), datasets audited by :func:`_audit_dataset`."""
    if depth > 4:
        raise _Refused(f"{path}: {prefix} is nested deeper than any fisherlab checkpoint; the file is corrupted")
    for n in _check_links(path, grp, prefix):
        budget[0] -= 1
        if budget[0] < 0:
            raise _Refused(f"{path}: more than {_MAX_OBJECTS} objects; not a fisherlab file")
        where = f"{prefix}/{n}"
        try:
            obj = grp[n]
            rc = _refcount(obj)
        except Exception as err:
            raise _Unreadable(f"{path}: cannot open {where} ({_first_line(err)}); the file is corrupted") from None
        if rc != 1:
            raise _Refused(
                f"{path}: {where} is linked from {rc} places (fisherlab links every object once); refusing to use it"
            )
        if isinstance(obj, h5py.Dataset):
            _audit_dataset(path, obj, where)
        elif isinstance(obj, h5py.Group):
            _audit_tree(path, obj, where, depth + 1, budget)
        else:  # pragma: no cover - named datatypes
            raise _Refused(f"{path}: {where} is a {type(obj).__name__}, which fisherlab never writes")


def _audit_top(f: h5py.File, path: Path) -> None:
    """The root: only ``/checkpoints``, ``/staging`` (and ``.stale-*`` left by a recovery), hard
    links to distinct groups each linked once; their members hard links. Cheap (no descent)."""
    for n in _check_links(path, f, ""):
        if n not in _ROOT_MEMBERS and not n.startswith(_STALE):
            raise _Refused(f"{path}: unexpected object /{n} at the root (fisherlab writes /checkpoints and /staging only)")
    addrs = set()
    for n in _ROOT_MEMBERS:
        if n not in f:
            continue
        g = f[n]
        if not isinstance(g, h5py.Group):
            raise _Refused(f"{path}: /{n} is not a group; the file is corrupted")
        info = h5py.h5o.get_info(g.id)
        if info.rc != 1 or info.addr in addrs:
            raise _Refused(f"{path}: /{n} is linked from several places; refusing to use it")
        addrs.add(info.addr)
        _check_links(path, g, f"/{n}")


def _recovery_links(g: Any) -> int:
    """How many ``/.stale-checkpoints-<n>`` groups (left by :func:`_fresh_checkpoints`) hold a
    hard link to checkpoint group ``g``: the one other place a fisherlab file links it from."""
    f, n = g.file, 0
    addr = h5py.h5o.get_info(g.id).addr
    for top in _safe_keys(f):
        if not top.startswith(f"{_STALE}checkpoints-"):
            continue
        try:
            old = f[top]
            for k in _safe_keys(old):
                try:
                    if isinstance(old.get(k, getlink=True), h5py.HardLink) and h5py.h5o.get_info(old[k].id).addr == addr:
                        n += 1
                except Exception:  # its damaged entries
                    continue
        except Exception:
            continue
    return n


def _audit_checkpoint(path: Path, g: Any, prefix: str) -> None:
    """One checkpoint's whole tree (see :func:`_audit_tree`), its member names as save() writes them."""
    if not isinstance(g, h5py.Group):
        raise _Refused(f"{path}: {prefix} is not a group; the file is corrupted")
    rc = _refcount(g)
    if rc != 1 and rc != 1 + _recovery_links(g):
        raise _Refused(f"{path}: {prefix} is linked from {rc} places (fisherlab links every object once); refusing to use it")
    names = _safe_keys(g)
    odd = [n for n in names if n not in _CKPT_MEMBERS]
    if odd:
        raise _Refused(f"{path}: {prefix} holds unexpected member(s) {odd}; the file is corrupted")
    _audit_tree(path, g, prefix, 1, [_MAX_OBJECTS])
    if "layers" in g:
        for i in _safe_keys(g["layers"]):
            odd = [k for k in _safe_keys(g["layers"][i]) if k not in _DS_ORDER]
            if not i.isdigit() or odd or isinstance(g["layers"][i], h5py.Dataset):
                raise _Refused(f"{path}: {prefix}/layers/{i} is not a layer group save() writes; the file is corrupted")


def _audit_all(f: h5py.File, path: Path) -> None:
    """Every checkpoint and staging entry (before a write): refusals raise; what a killed writer
    left unreadable does not (the writer replaces or moves it aside)."""
    for top in _ROOT_MEMBERS:
        grp = f.get(top)
        if grp is None:
            continue
        for n in _safe_keys(grp):
            if n.startswith(_STALE):
                continue
            try:
                _audit_checkpoint(path, grp[n], f"/{top}/{n}")
            except _Refused:
                raise
            except Exception:
                continue


def _check_allocated(path: Path, ds: Any, where: str, key: str) -> None:
    """A dataset whose storage the file does not hold in full (sparse, unallocated chunks) was not
    written by save(); refuse it before allocating its declared size. Also a memory budget."""
    shape = tuple(int(s) for s in ds.shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * ds.dtype.itemsize
    if nbytes == 0:
        return
    if ds.chunks is None:
        ok = int(ds.id.get_storage_size()) == nbytes
    else:
        expect = int(np.prod([-(-s // c) for s, c in zip(shape, ds.chunks)], dtype=np.int64))
        try:
            ok = int(ds.id.get_num_chunks()) == expect
        except Exception:  # pragma: no cover - older HDF5
            ok = int(ds.id.get_storage_size()) > 0
    if not ok:
        raise StoreError(
            f"{where}: dataset '{key}' declares {nbytes} bytes but the file does not hold them "
            "(sparse or unwritten storage); the file is corrupted"
        )
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise StoreError(
            f"{where}: dataset '{key}' needs {nbytes / 2**30:.2f} GiB, more than the {avail / 2**30:.2f} GiB "
            "of memory available; read it on a larger machine or layer by layer (CaptureFile.read_layer)"
        )


def _json_depth_ok(s: str) -> bool:
    depth = best = 0
    in_str = esc = False
    for ch in s:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
            if best > _MAX_JSON_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _attrs_digest(obj: Any, extra: Sequence[Any] = ()) -> int:
    """CRC-32 of an object's attributes (all but ``complete`` and ``attrs_crc32``) as read back,
    and of the attributes of ``extra`` objects (a checkpoint's layer groups)."""
    parts = []
    for o in (obj, *extra):
        items = []
        for k in sorted(o.attrs.keys()):
            if k in ("complete", "attrs_crc32"):
                continue
            v = _attr(o, k)
            if isinstance(v, np.ndarray):
                v = v.tolist()
            items.append([k, type(v).__name__, v])
        parts.append(items)
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return zlib.crc32(blob) & 0xFFFFFFFF


def _seal(obj: Any, extra: Sequence[Any] = ()) -> None:
    obj.attrs["attrs_crc32"] = np.int64(_attrs_digest(obj, extra))


def _verify_attrs(path: Path, obj: Any, where: str, extra: Sequence[Any] = (), required: bool = False) -> None:
    stored = _attr(obj, "attrs_crc32")
    if stored is None:
        if required:
            raise StoreError(f"{where}: the attribute checksum (attrs_crc32) is missing; the file is corrupted")
        return  # written before attribute checksums existed
    try:
        got = _attrs_digest(obj, extra)
    except Exception as err:
        raise StoreError(f"{where}: cannot read the attributes ({_first_line(err)}); the file is corrupted") from None
    if not isinstance(stored, int) or int(stored) != got:
        raise StoreError(f"{where}: attribute checksum mismatch (metadata changed after writing); the file is corrupted")


def _os_cause(err: BaseException) -> str | None:
    """'disk full', 'read-only file system', … when an OS error is behind an HDF5 failure."""
    import errno as _errno

    chain, e = [], err
    while e is not None and len(chain) < 8:  # HDF5's close after a failed flush hides the first error
        chain.append(e)
        e = e.__cause__ or e.__context__
    s = " ".join(str(e) for e in chain)
    code = next((getattr(e, "errno", None) for e in chain if getattr(e, "errno", None)), None)
    table = [
        (_errno.ENOSPC, ("No space left", "errno = 28"), "the disk is full (no space left on device)"),
        (_errno.EFBIG, ("File too large", "errno = 27"), "the file size limit was reached (file too large)"),
        (_errno.EDQUOT, ("Disk quota exceeded", "errno = 122"), "the disk quota is exceeded"),
        (_errno.EROFS, ("Read-only file system", "errno = 30"), "the file system is read-only"),
        (_errno.EACCES, ("Permission denied", "errno = 13"), "permission denied"),
        (_errno.EPERM, ("Operation not permitted", "errno = 1,"), "operation not permitted"),
        (_errno.EIO, ("Input/output error", "errno = 5,"), "an input/output error of the device"),
    ]
    for num, needles, text in table:
        if code == num or any(n in s for n in needles):
            return text
    return None


# --------------------------------------------------------------------------------------------
# opening files with one-line errors
# --------------------------------------------------------------------------------------------


def _open(path: Path, mode: str) -> h5py.File:
    """Open a fisherlab file; every failure is a :class:`StoreError` naming the file."""
    if not path.exists():
        raise StoreError(f"{path}: no such file")
    if path.is_dir():
        raise StoreError(f"{path}: is a directory, not a fisherlab HDF5 file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as err:
        raise StoreError(f"{path}: cannot read ({_first_line(err)})") from None
    if not h5py.is_hdf5(str(path)):
        if len(head) == 0:
            raise StoreError(f"{path}: not an HDF5 file (empty file)")
        raise StoreError(f"{path}: not an HDF5 file")
    try:
        f = h5py.File(path, mode, libver=_LIBVER)
    except OSError as err:
        msg = _first_line(err)
        cause = _os_cause(err)
        if cause is not None:
            action = "read" if mode == "r" else "open for writing"
            raise StoreError(f"{path}: cannot {action}: {cause}") from None
        if "truncated" in msg.lower():
            raise StoreError(f"{path}: truncated HDF5 file ({msg}); was it copied or written completely?") from None
        if "lock" in msg.lower():
            raise StoreError(f"{path}: locked by another process (is a capture still writing it?)") from None
        raise StoreError(f"{path}: corrupted HDF5 file, cannot open it ({msg})") from None
    try:
        fmt = _attr(f, "format")
        if fmt != FORMAT:
            raise StoreError(f"{path}: HDF5 file but not a fisherlab file (no format='fisherlab' attribute)")
        version = _attr(f, "schema_version")
        if not isinstance(version, int):
            raise StoreError(f"{path}: unknown schema version {version!r} (this fisherlab reads version {SCHEMA_VERSION})")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path}: schema version {version} is newer than this fisherlab "
                f"({_version()}, schema {SCHEMA_VERSION}); upgrade fisherlab"
            )
        if version < 1:
            raise StoreError(f"{path}: unknown schema version {version} (this fisherlab reads version {SCHEMA_VERSION})")
        _verify_attrs(path, f, f"{path}: root")
        _audit_top(f, path)
    except StoreError:
        f.close()
        raise
    except Exception as err:  # corrupted attributes
        f.close()
        raise StoreError(f"{path}: corrupted fisherlab file, cannot read its attributes ({_first_line(err)})") from None
    return f


# --------------------------------------------------------------------------------------------
# the lazy reader
# --------------------------------------------------------------------------------------------


def _guarded(fn: Callable) -> Callable:
    """Public readers: an HDF5 failure on damaged metadata (``addr overflow``, a bad B-tree node)
    becomes a one-line :class:`StoreError` naming the file, never a raw traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(self_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self_or_path, *args, **kwargs)
        except (KeyError, RuntimeError, OSError, TypeError, AttributeError, IndexError, RecursionError, ValueError) as err:
            if isinstance(err, (StoreError, NonFiniteError)) or type(err).__module__.startswith("fisherlab"):
                raise
            path = getattr(self_or_path, "path", self_or_path)
            cause = _os_cause(err)
            if cause is not None:
                raise StoreError(f"{path}: cannot read: {cause}") from None
            raise StoreError(f"{path}: the file is corrupted ({type(err).__name__}: {_first_line(err)[:200]})") from None

    return wrapper


class CaptureFile:
    """A fisherlab HDF5 file open for reading; reads one checkpoint or one layer at a time.

    Example::

        with CaptureFile("run.h5") as cf:
            for info in cf.checkpoints:            # complete and incomplete ones
                ...
            lc = cf.read_layer("step-1000", 0)     # a LayerCapture, read and verified
            g = cf.read_grad("step-1000")          # ∇h [p]

    Every array read is checked against the layer table (shapes), its stored CRC-32 and for
    NaN/Inf; failures are one-line :class:`StoreError` / :class:`NonFiniteError` naming the file,
    checkpoint and layer.

    Args:
        path: the file.
        verify: check CRC-32 checksums on read (default ``True``).
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True) -> None:
        self.path = Path(path)
        self.verify = verify
        self._f: h5py.File | None = None

    # ---- context ---------------------------------------------------------------------------
    def open(self) -> "CaptureFile":
        if self._f is None:
            self._f = _open(self.path, "r")
        return self

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "CaptureFile":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def file(self) -> h5py.File:
        if self._f is None:
            self.open()
        assert self._f is not None
        return self._f

    # ---- run-level metadata ----------------------------------------------------------------
    @property
    @_guarded
    def run(self) -> dict:
        """Root attributes: format, versions, created, model, loss, fisher, K, B (layout apart)."""
        f = self.file
        where = f"{self.path}: root"
        return {
            "format": _attr(f, "format"),
            "schema_version": _attr(f, "schema_version"),
            "fisherlab_version": _typed(f, "fisherlab_version", (str,), where, optional=True),
            "created": _typed(f, "created", (str,), where, optional=True),
            "model": _typed(f, "model", (dict,), where, json_=True, optional=True) or {},
            "loss": _typed(f, "loss", (str,), where),
            "fisher": _typed(f, "fisher", (str,), where),
            "n_vectors": _typed(f, "n_vectors", (int,), where),
            "batch_size": _typed(f, "batch_size", (int,), where),
        }

    @property
    @_guarded
    def layout(self) -> Layout:
        try:
            return Layout.from_json(_attr(self.file, "layout"))
        except Exception as err:
            raise StoreError(f"{self.path}: cannot read the layout attribute ({_first_line(err)})") from None

    # ---- checkpoints -----------------------------------------------------------------------
    @property
    @_guarded
    def checkpoints(self) -> list[CheckpointInfo]:
        """Every checkpoint in the file: complete ones first (file order), then incomplete ones."""
        out: list[CheckpointInfo] = []
        seen: set[str] = set()
        for group_name in ("checkpoints", "staging"):
            grp = self.file.get(group_name)
            if grp is None:
                continue
            for name in _safe_keys(grp):
                if group_name == "staging" and (name in seen or name.startswith(".stale-")):
                    continue
                out.append(self._info(grp, name, staging=group_name == "staging"))
                seen.add(name)
        return out

    @property
    def complete(self) -> list[str]:
        """Names of the complete checkpoints, in the order they were written."""
        return [c.name for c in self.checkpoints if c.complete]

    def _info(self, grp: Any, name: str, *, staging: bool, details: bool = True) -> CheckpointInfo:
        where = _where(self.path, name)
        committed = False
        try:
            g = grp[name]
            committed = (not staging) and _attr(g, "complete", False) is True
            _audit_checkpoint(self.path, g, f"/{'staging' if staging else 'checkpoints'}/{name}")
            complete = committed
            status = "complete" if complete else ("incomplete (writer stopped)" if staging else "incomplete")
            layers: list[LayerInfo] = []
            datasets: list[DatasetInfo] = []
            rows = _jattr(g, "layers", [], where)
            if not isinstance(rows, list):
                raise StoreError(f"{where}: the layer table is not a list")
            for row in rows:
                dsi: tuple[DatasetInfo, ...] = ()
                index, shapes = int(row["index"]), dict(row["shapes"])
                if details:
                    lg = g.get(f"layers/{index}")
                    keys = [k for k in _DS_ORDER if k in shapes]
                    dsi = tuple(_ds_info(lg, k) for k in keys if k in lg) if lg is not None else ()
                layers.append(
                    LayerInfo(index, str(row["name"]), str(row["kind"]), str(row["storage"]), int(row["positions"]), shapes, dsi)
                )
            if details:
                datasets = [_ds_info(g, k) for k in ("grad", "targets", "sampled") if k in g]
            all_ds = [d for li in layers for d in li.datasets] + datasets
            opt_int = lambda k: _typed(g, k, (int,), where, json_=True, optional=True)  # noqa: E731
            bi = _jattr(g, "batch_indices", None, where)
            if bi is not None and not (isinstance(bi, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in bi)):
                raise StoreError(f"{where}: attribute 'batch_indices' is not a list of integers")
            opt = lambda k, kinds: _typed(g, k, kinds, where, optional=True)  # noqa: E731
            sample = _jattr(g, "sample", None, where)
            if sample is not None and not (isinstance(sample, dict) and isinstance(sample.get("of"), str)):
                raise StoreError(f"{where}: attribute 'sample' is not a sample description")
            return CheckpointInfo(
                name=name,
                complete=complete,
                step=opt_int("step"),
                batch_indices=bi,
                seed=opt_int("seed"),
                loss_value=opt("loss_value", (float, int)),
                loss=opt("loss", (str,)),
                fisher=opt("fisher", (str,)),
                batch_size=opt("batch_size", (int,)),
                n_vectors=opt("n_vectors", (int,)),
                dtype=opt("dtype", (str,)),
                created=opt("created", (str,)),
                layers=tuple(layers),
                datasets=tuple(datasets),
                nbytes=sum(d.nbytes for d in all_ds if d.nbytes >= 0),
                stored_bytes=sum(d.stored_bytes for d in all_ds if d.stored_bytes >= 0),
                status=status,
                sample=sample,
            )
        except _Refused:
            raise  # links out of the file, foreign storage: never just "incomplete" or "damaged"
        except Exception as err:  # a killed writer may leave unreadable staging metadata
            return self._broken(name, committed, err)

    def _broken(self, name: str, committed: bool, err: BaseException) -> CheckpointInfo:
        msg = _first_line(err).replace(f"{self.path}: ", "")
        if committed:  # it was committed: its metadata were damaged afterwards
            return CheckpointInfo(name=name, complete=False, damaged=True, status=f"damaged (unreadable: {msg})")
        return CheckpointInfo(name=name, complete=False, status=f"incomplete (unreadable: {msg})")

    def _group(self, checkpoint: str | None) -> tuple[str, Any]:
        """The group of a *complete* checkpoint (``None``: the only or the last one), audited."""
        f = self.file
        ckpts = f.get("checkpoints")
        names = _safe_keys(ckpts) if ckpts is not None else []
        complete = []
        for n in names:
            try:
                if _attr(ckpts[n], "complete", False) is True:
                    complete.append(n)
            except Exception as err:
                # (a writer killed inside its commit's flush damages only its own checkpoint:
                # the others stay loadable)
                if checkpoint is None or str(checkpoint) == n:
                    raise StoreError(f"{_where(self.path, n)} is damaged: cannot read it ({_first_line(err)})") from None
        if checkpoint is None:
            if not complete:
                staged = _safe_keys(f["staging"]) if "staging" in f else []
                pending = names + [n for n in staged if not n.startswith(_STALE)]
                extra = f" (incomplete: {', '.join(pending)})" if pending else ""
                raise StoreError(f"{self.path}: no complete checkpoint{extra}")
            if len(complete) > 1:
                warnings.warn(
                    f"{self.path} has {len(complete)} checkpoints ({', '.join(complete)}); loading the last, "
                    f"'{complete[-1]}' (pass checkpoint=... to choose)",
                    UserWarning,
                    stacklevel=3,
                )
            checkpoint = complete[-1]
        checkpoint = str(checkpoint)
        if checkpoint not in complete:
            staged = "staging" in f and checkpoint in f["staging"]
            if checkpoint in names or staged:
                raise StoreError(
                    f"{_where(self.path, checkpoint)} is incomplete (its writer stopped before the end); "
                    "rerun the capture to resume it"
                )
            listed = ", ".join(complete) if complete else "none"
            raise StoreError(f"{self.path}: no checkpoint '{checkpoint}' (complete checkpoints: {listed})")
        g = ckpts[checkpoint]
        _audit_checkpoint(self.path, g, f"/checkpoints/{checkpoint}")
        return checkpoint, g

    @_guarded
    def info(self, checkpoint: str | None = None) -> CheckpointInfo:
        """The :class:`CheckpointInfo` of a complete checkpoint (``None``: the last)."""
        name, _ = self._group(checkpoint)
        return self._info(self.file["checkpoints"], name, staging=False)

    # ---- reading arrays --------------------------------------------------------------------
    def _read(self, g: Any, key: str, shape: list[int] | None, where: str) -> np.ndarray:
        if key not in g:
            raise StoreError(f"{where}: dataset '{key}' is missing")
        ds = g[key]
        if not isinstance(ds, h5py.Dataset):
            raise StoreError(f"{where}: '{key}' is not a dataset; the file is corrupted")
        if shape is not None and list(ds.shape) != list(shape):
            raise StoreError(
                f"{where}: dataset '{key}' has shape {list(ds.shape)}, the layer table expects {list(shape)}"
            )
        _check_allocated(self.path, ds, where, key)
        try:
            arr = ds[()]
        except Exception as err:
            cause = _os_cause(err)
            if cause is not None:
                raise StoreError(f"{where}: cannot read dataset '{key}': {cause}") from None
            raise StoreError(f"{where}: cannot read dataset '{key}' ({_first_line(err)}); the file is corrupted") from None
        arr = np.asarray(arr)
        if self.verify:
            stored = _attr(ds, "crc32")
            if stored is None:
                raise StoreError(f"{where}: dataset '{key}' has no checksum (crc32 attribute)")
            if isinstance(stored, bool) or not isinstance(stored, int):
                raise StoreError(f"{where}: dataset '{key}' has a malformed checksum attribute; the file is corrupted")
            got = _crc(arr)
            if int(stored) != got:
                raise StoreError(
                    f"{where}: checksum mismatch in dataset '{key}' (stored crc32 {int(stored) & 0xFFFFFFFF:08x}, "
                    f"read {got:08x}); the file is corrupted"
                )
        bad = _count_non_finite(arr)
        if bad:
            raise NonFiniteError(f"{where}: {bad} non-finite value(s) (NaN/Inf) in dataset '{key}'")
        return arr

    def _layer_rows(self, name: str, g: Any, layout: Layout) -> list[dict]:
        """The checkpoint's layer table checked against the layout, then its attribute checksum."""
        where = _where(self.path, name)
        rows = _jattr(g, "layers", None, where)
        if not isinstance(rows, list) or len(rows) != len(layout):
            n = "no" if rows is None else (len(rows) if isinstance(rows, list) else "no valid")
            raise StoreError(f"{where}: the layer table has {n} rows, the layout {len(layout)} layers")
        B = _typed(g, "batch_size", (int,), where)
        K = _typed(g, "n_vectors", (int,), where)
        for i, (row, spec) in enumerate(zip(rows, layout.layers)):
            if not isinstance(row, dict):
                raise StoreError(f"{where}, layer {i}: the layer table's row is not an object; the file is corrupted")
            if row.get("name") != spec.name:
                raise StoreError(f"{where}, layer {i}: the layer table names '{row.get('name')}', the layout '{spec.name}'")
            shapes, T = row.get("shapes"), row.get("positions")
            if not isinstance(shapes, dict) or isinstance(T, bool) or not isinstance(T, int) or T < 1 or row.get("index") != i:
                raise StoreError(f"{where}, layer {i} '{spec.name}': malformed layer table row; the file is corrupted")
            try:
                expect = _expected_shapes(spec, row.get("storage"), B, K, T, kfac="A" in shapes)
            except ValueError as err:
                raise StoreError(f"{where}, layer {i} '{spec.name}': {err}") from None
            if not all(isinstance(v, list) for v in shapes.values()) or {k: list(v) for k, v in shapes.items()} != expect:
                raise StoreError(
                    f"{where}, layer {i} '{spec.name}': the layer table's shapes {shapes} disagree with "
                    f"the layout (expected {expect})"
                )
        _verify_attrs(self.path, g, where, required=self._sealed)
        return rows

    @property
    def _sealed(self) -> bool:
        """Files written with attribute checksums must have them on every object."""
        return _attr(self.file, "attrs_crc32") is not None

    @_guarded
    def read_layer(self, checkpoint: str | None, layer: int | str) -> LayerCapture:
        """Read one layer: factors ``a [B, T, d_in']``, ``g [B, K, T, d_out]`` or dense ``J [N, p_i]``."""
        name, g = self._group(checkpoint)
        layout = self.layout
        try:
            i = layout.index(layer)
        except (KeyError, IndexError) as err:
            raise StoreError(f"{_where(self.path, name)}: {err.args[0]}") from None
        rows = self._layer_rows(name, g, layout)
        return self._read_layer(name, g, layout, rows, i)

    def _read_layer(self, name: str, g: Any, layout: Layout, rows: list[dict], i: int) -> LayerCapture:
        spec, row = layout.layers[i], rows[i]
        where = _where(self.path, name, i, spec.name)
        lg = g.get(f"layers/{i}")
        if lg is None:
            raise StoreError(f"{where}: layer is missing (no group layers/{i})")
        _verify_attrs(self.path, lg, where, required=self._sealed)
        arrays = {k: torch.from_numpy(self._read(lg, k, shape, where)) for k, shape in row["shapes"].items()}
        if row["storage"] == Storage.DENSE.value:
            return LayerCapture(spec, int(row["positions"]), dense=arrays["J"], A=arrays.get("A"), G=arrays.get("G"))
        return LayerCapture(spec, int(row["positions"]), a=arrays["a"], g=arrays["g"])

    @_guarded
    def layer_reader(self, checkpoint: str | None = None) -> Callable[[int], LayerCapture]:
        """``read(i)``: layer ``i`` of a checkpoint, read and verified as by :meth:`read_layer`,
        with the checkpoint's group, layout and layer table checked once, here, and each layer's
        checksums on its first read (a committed checkpoint is never rewritten): for readers that
        come back to the layers many times (the streamed Jacobian, :mod:`fisherlab.planning`)."""
        name, g = self._group(checkpoint)
        layout = self.layout
        rows = self._layer_rows(name, g, layout)
        known: dict[int, dict] = {}  # layer → its datasets (handles, no arrays), once verified

        def read(_self: Any, i: int) -> LayerCapture:
            if i not in known:  # the first read: every check of read_layer
                lc = self._read_layer(name, g, layout, rows, i)
                lg = g[f"layers/{i}"]
                known[i] = {k: lg[k] for k in rows[i]["shapes"]}
                return lc
            arrays = {k: torch.from_numpy(np.asarray(ds[()])) for k, ds in known[i].items()}  # verified before
            spec, T = layout.layers[i], int(rows[i]["positions"])
            if rows[i]["storage"] == Storage.DENSE.value:
                return LayerCapture(spec, T, dense=arrays["J"], A=arrays.get("A"), G=arrays.get("G"))
            return LayerCapture(spec, T, a=arrays["a"], g=arrays["g"])

        guarded = _guarded(read)
        return lambda i: guarded(self, i)

    def iter_layers(self, checkpoint: str | None = None) -> Iterator[LayerCapture]:
        """Yield the layers of a checkpoint one at a time (only one layer in memory)."""
        name, g = self._group(checkpoint)
        layout = self.layout
        rows = self._layer_rows(name, g, layout)
        for i in range(len(layout)):
            yield self._read_layer(name, g, layout, rows, i)

    @_guarded
    def fingerprint(self, checkpoint: str | None = None) -> str:
        """A hex digest of a complete checkpoint's stored checksums — every dataset's ``crc32``,
        shape and dtype, and the checkpoint's and its layers' ``attrs_crc32`` — read without
        reading an array: it changes whenever the checkpoint's data or metadata do (the setup
        cache, :mod:`fisherlab.cache`, is keyed by it)."""
        import hashlib

        name, g = self._group(checkpoint)
        h = hashlib.sha256(f"{name}\0{_attr(self.file, 'layout')}".encode())

        def add(grp: Any, prefix: str) -> None:
            h.update(f"{prefix}:{_attr(grp, 'attrs_crc32')}".encode())
            for key in sorted(_safe_keys(grp)):
                obj = grp[key]
                if isinstance(obj, h5py.Dataset):
                    h.update(f"|{prefix}/{key}:{_attr(obj, 'crc32')}:{list(obj.shape)}:{obj.dtype.str}".encode())

        add(g, "")
        h.update(str(_attr(g, "layers")).encode())
        for i in range(len(self.layout)):
            lg = g.get(f"layers/{i}")
            if lg is not None:
                add(lg, str(i))
        return h.hexdigest()[:32]

    @_guarded
    def read_grad(self, checkpoint: str | None = None) -> Tensor:
        """∇h ``[p]`` of a checkpoint, fisherlab order."""
        name, g = self._group(checkpoint)
        layout = self.layout
        self._layer_rows(name, g, layout)  # the attribute checksum
        return torch.from_numpy(self._read(g, "grad", [layout.p], _where(self.path, name)))

    @_guarded
    def read_capture(self, checkpoint: str | None = None, layers: Sequence[int | str] | None = None) -> Capture:
        """The :class:`Capture` of a checkpoint, read layer by layer. See :func:`load`."""
        name, g = self._group(checkpoint)
        where = _where(self.path, name)
        layout = self.layout
        rows = self._layer_rows(name, g, layout)
        if layers is None:
            idx = list(range(len(layout)))
        else:
            try:
                idx = [layout.index(x) for x in layers]
            except (KeyError, IndexError) as err:
                raise StoreError(f"{where}: {err.args[0]}") from None
            if len(set(idx)) != len(idx):
                raise StoreError(f"{where}: layers {list(layers)} repeat a layer")
        B, K = _typed(g, "batch_size", (int,), where), _typed(g, "n_vectors", (int,), where)
        run = self.run
        if B != run["batch_size"] or K != run["n_vectors"] or B < 1 or K < 1:
            raise StoreError(f"{where}: B = {B}, K = {K} disagree with the run's B = {run['batch_size']}, K = {run['n_vectors']}")
        loss = _typed(g, "loss", (str,), where)
        fisher = _typed(g, "fisher", (str,), where)
        if loss != run["loss"] or fisher != run["fisher"]:
            raise StoreError(f"{where}: loss/fisher '{loss}'/'{fisher}' disagree with the run's '{run['loss']}'/'{run['fisher']}'")
        try:
            fisher_mode = FisherMode(fisher)
        except ValueError:
            raise StoreError(f"{where}: unknown fisher mode {fisher!r}; the file is corrupted") from None
        loss_value = float(_typed(g, "loss_value", (float, int), where))
        step = _typed(g, "step", (int,), where, json_=True, optional=True)
        seed = _typed(g, "seed", (int,), where, json_=True, optional=True)
        meta = _typed(g, "meta", (dict,), where, json_=True, optional=True) or {}
        bi = _jattr(g, "batch_indices", None, where)
        if bi is not None and not (
            isinstance(bi, list) and len(bi) == B and all(isinstance(i, int) and not isinstance(i, bool) for i in bi)
        ):
            raise StoreError(f"{where}: attribute 'batch_indices' is not a list of {B} integers; the file is corrupted")
        grad = torch.from_numpy(self._read(g, "grad", [layout.p], where))
        targets_ds = g.get("targets")
        if targets_ds is not None and (targets_ds.ndim not in (1, 2) or targets_ds.shape[:1] != (B,)):
            raise StoreError(f"{where}: dataset 'targets' has shape {list(targets_ds.shape)}, expected {B} rows")
        targets = torch.from_numpy(self._read(g, "targets", None, where))
        sampled = None
        if "sampled" in g:
            sds = g["sampled"]
            if sds.ndim != targets.ndim + 1 or tuple(sds.shape) != (K, *targets.shape):
                raise StoreError(f"{where}: dataset 'sampled' has shape {list(sds.shape)}, expected [{K}, {B}, ...]")
            sampled = torch.from_numpy(self._read(g, "sampled", None, where))
        lcs = [self._read_layer(name, g, layout, rows, i) for i in idx]
        meta = dict(meta)
        meta["checkpoint"] = name
        meta["step"] = step
        if bi is not None:
            meta["batch_indices"] = bi
        if layers is not None and idx != list(range(len(layout))):
            layout, grad = _restrict(layout, idx, grad)
            lcs = [replace(lc, spec=s) for lc, s in zip(lcs, layout.layers)]
            meta["layers"] = idx
        return Capture(
            layout=layout,
            layers=lcs,
            grad=grad,
            loss_value=loss_value,
            loss=loss,
            fisher=fisher_mode,
            batch_size=B,
            n_vectors=K,
            targets=targets,
            sampled=sampled,
            seed=seed,
            model=run["model"],
            meta=meta,
        )


def _safe_keys(grp: Any) -> list[str]:
    try:
        return list(grp.keys())
    except Exception:  # pragma: no cover - unreadable group
        return []


def _ds_info(g: Any, key: str) -> DatasetInfo:
    ds = g[key]
    try:
        stored = int(ds.id.get_storage_size())
    except Exception:  # pragma: no cover
        stored = -1
    return DatasetInfo(
        name=key,
        shape=tuple(int(s) for s in ds.shape),
        dtype=str(ds.dtype),
        chunks=tuple(ds.chunks) if ds.chunks else None,
        compression=ds.compression,
        nbytes=int(np.prod(ds.shape, dtype=np.int64)) * ds.dtype.itemsize,
        stored_bytes=stored,
    )


def _restrict(layout: Layout, idx: list[int], grad: Tensor) -> tuple[Layout, Tensor]:
    """The layout of the layers ``idx`` alone (fisherlab offsets recomputed, torch offsets kept)."""
    specs, parts, off = [], [], 0
    for i in idx:
        s = layout.layers[i]
        specs.append(replace(s, offset=off))
        parts.append(grad[s.offset : s.stop])
        off += s.numel
    dropped = [f"{s.name} ({s.kind.value}, not loaded)" for j, s in enumerate(layout.layers) if j not in idx]
    return Layout(tuple(specs), layout.torch_numel, tuple(layout.excluded) + tuple(dropped)), torch.cat(parts)


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------


@_guarded
def load(
    path: str | os.PathLike,
    checkpoint: str | None = None,
    layers: Sequence[int | str] | None = None,
    *,
    verify: bool = True,
) -> Capture:
    """Read a :class:`Capture` from a fisherlab HDF5 file, one dataset at a time.

    Args:
        path: the file written by :func:`save` (or ``fisherlab capture``).
        checkpoint: a complete checkpoint's name; ``None`` takes the only one, or the last one
            written (with a warning naming it when there are several).
        layers: layer indices or names to read (default: all). With a subset the returned
            capture's layout holds those layers only (fisherlab offsets recomputed, ∇h restricted)
            and ``meta["layers"]`` lists their indices in the file.
        verify: check the stored CRC-32 of every array read.

    Returns:
        A capture equal (:meth:`Capture.equals`) to the saved one, except that ``meta`` also holds
        ``checkpoint``, ``step`` and (when known) ``batch_indices``.

    Raises:
        StoreError: missing, non-HDF5, non-fisherlab, newer-schema or truncated file; incomplete or
            missing checkpoint; missing layer or dataset; shapes that disagree with the layer table;
            checksum mismatch.
        NonFiniteError: NaN/Inf in a stored array.
    """
    with CaptureFile(path, verify=verify) as cf:
        return cf.read_capture(checkpoint, layers)


@_guarded
def list_checkpoints(path: str | os.PathLike) -> list[CheckpointInfo]:
    """Every checkpoint of a file, complete ones first, with step, batch and layer table."""
    with CaptureFile(path) as cf:
        return cf.checkpoints


def select_checkpoints(path: str | os.PathLike, names: Sequence[str] | None = None) -> list[CheckpointInfo]:
    """The complete checkpoints of ``path`` to analyse: those named, in the order given, or all of
    them in training order (by step when every one has a step, else in file order).

    Raises:
        StoreError: a named checkpoint is not complete in the file, or none is complete.
    """
    infos = [c for c in list_checkpoints(path) if c.complete]
    if all(c.step is not None for c in infos):
        infos.sort(key=lambda c: c.step)
    if names:
        known = {c.name: c for c in infos}
        missing = [n for n in names if n not in known]
        if missing:
            raise StoreError(f"{path}: no complete checkpoint named {', '.join(missing)} (have: {', '.join(known) or 'none'})")
        infos = [known[n] for n in names]
    if not infos:
        raise StoreError(f"{path}: no complete checkpoint to analyse")
    return infos


@_guarded
def file_info(path: str | os.PathLike) -> dict:
    """Everything ``fisherlab inspect`` shows: run metadata, layout, checkpoints with datasets."""
    p = Path(path)
    with CaptureFile(p) as cf:
        info = cf.run
        info["path"] = str(p)
        info["file_bytes"] = p.stat().st_size
        info["layout"] = cf.layout
        info["checkpoints"] = cf.checkpoints
    return info


def _validate(capture: Capture) -> None:
    if len(capture.layers) != len(capture.layout):
        raise StoreError(f"capture has {len(capture.layers)} layers but its layout {len(capture.layout)}")
    for i, lc in enumerate(capture.layers):
        got = _layer_arrays(lc)
        expect = _expected_shapes(lc.spec, lc.storage.value, capture.B, capture.K, lc.positions, kfac="A" in got)
        for k, t in got.items():
            if t is None or list(t.shape) != expect[k]:
                raise StoreError(
                    f"capture layer {i} '{lc.spec.name}': {k} has shape {None if t is None else list(t.shape)}, "
                    f"expected {expect[k]}"
                )
    if list(capture.grad.shape) != [capture.p]:
        raise StoreError(f"capture grad has shape {list(capture.grad.shape)}, expected [{capture.p}]")


def _check_name(name: str) -> str:
    name = str(name)
    if (
        not name or "/" in name or name.startswith(".") or name.strip() != name
        or any(not ch.isprintable() for ch in name) or len(name.encode("utf-8", "replace")) > 255
    ):
        raise StoreError(
            f"invalid checkpoint name {name!r} (non-empty, printable, at most 255 bytes, no '/', "
            "no leading '.' or spaces)"
        )
    return name


def save(
    capture: Capture,
    path: str | os.PathLike,
    checkpoint: str | None = None,
    step: int | None = None,
    compression: str | None = None,
    overwrite: bool = False,
    *,
    batch_indices: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    fsync: bool = True,
) -> None:
    """Append a capture to a run's HDF5 file as one checkpoint, atomically (schema v1).

    The checkpoint is staged, checksummed (CRC-32 per dataset), flushed, and only then moved
    under ``/checkpoints`` and marked complete; a writer killed half-way leaves earlier
    checkpoints readable, and saving the same name again replaces the incomplete attempt.

    Args:
        capture: what to store. Its layout, loss, Fisher mode, K, B and model description must
            match the run's (the first checkpoint of the file sets them).
        path: the run's file; created (atomically, through ``<path>.partial``) if missing.
        checkpoint: the checkpoint's name (default ``capture.meta["checkpoint"]``, else
            ``"checkpoint-<n>"``).
        step: training step (default ``capture.meta.get("step")``).
        compression: ``None`` (default, fastest), ``"lzf"`` or ``"gzip"``.
        overwrite: replace a *complete* checkpoint of the same name (incomplete ones always are).
        batch_indices: indices of the batch's examples in their data set (default
            ``capture.meta.get("batch_indices")``).
        dtype: cast floating arrays (e.g. ``torch.float32``); default: keep the capture's dtype.
        fsync: ``os.fsync`` the file at each commit (durability against power loss as well).

    Raises:
        StoreError: the file is not a fisherlab file, the run's configuration differs, the
            checkpoint exists (without ``overwrite``), bad arguments.
        NonFiniteError: NaN/Inf in the capture.
    """
    if compression not in COMPRESSIONS:
        raise StoreError(f"unknown compression {compression!r} (choose None, 'lzf' or 'gzip')")
    if dtype is not None and dtype not in (torch.float32, torch.float64, torch.float16):
        raise StoreError(f"dtype must be torch.float16, float32 or float64, got {dtype}")
    _validate(capture)
    path = Path(path)
    if checkpoint is None:
        checkpoint = capture.meta.get("checkpoint")
    if step is None:
        step = capture.meta.get("step")
    if batch_indices is None:
        batch_indices = capture.meta.get("batch_indices")
    if batch_indices is not None:
        batch_indices = [int(i) for i in batch_indices]
        if len(batch_indices) != capture.B:
            raise StoreError(f"batch_indices has {len(batch_indices)} entries for a batch of {capture.B}")
    if step is not None:
        step = int(step)
    if checkpoint is not None:
        checkpoint = _check_name(checkpoint)  # before anything touches the file
    run = _run_attrs(capture)
    need = _check_free_space(path, capture, dtype)
    reserved = False
    try:
        if not path.exists() and _create(path, run, capture, checkpoint, step, batch_indices, compression, dtype, fsync, need):
            return
        reserved = _reserve(path, need)
        with _open(path, "a") as f:
            _audit_all(f, path)
            _check_run(f, path, run)
            ckpts = f["checkpoints"] if "checkpoints" in f else f.create_group("checkpoints")
            names = list(ckpts.keys())
            name = _check_name(checkpoint if checkpoint is not None else f"checkpoint-{len(names)}")
            if name in ckpts and _readably_complete(ckpts, name) and not overwrite:
                raise StoreError(f"{_where(path, name)} exists already (pass overwrite=True, or --overwrite to fisherlab capture, to replace it)")
            _clear_staging(f, path)
            _write_checkpoint(f, path, capture, name, step, batch_indices, compression, dtype, fsync)
    except (OSError, RuntimeError) as err:  # from HDF5 (StoreError is a ValueError)
        cause = _os_cause(err)
        if cause is None:
            raise StoreError(f"{path}: HDF5 failed writing the checkpoint ({_first_line(err)})") from None
        raise StoreError(
            f"{path}: cannot write the checkpoint: {cause}; checkpoints committed before are intact"
        ) from None
    finally:
        if reserved:
            _release(path)


def _readably_complete(ckpts: Any, name: str) -> bool:
    """Whether ``/checkpoints/<name>`` is complete; an unreadable one (its writer killed inside
    the commit's flush) is not, and is replaced (moved aside when it cannot be deleted)."""
    try:
        return _attr(ckpts[name], "complete", False) is True
    except (KeyError, OSError, RuntimeError, StoreError):
        return False


def _free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):  # pragma: no cover
        return None
    return st.f_bavail * st.f_frsize


def _check_free_space(path: Path, capture: Capture, dtype: torch.dtype | None) -> int:
    """Refuse before writing when the file system cannot hold the checkpoint (a disk filling up
    half-way through HDF5 writes leaves the library in states it does not always survive); the
    bytes the checkpoint needs, which :func:`_reserve` then allocates."""
    if not path.parent.is_dir():
        raise StoreError(f"{path}: directory {path.parent} does not exist")
    scale = 1.0
    if dtype is not None and capture.grad.is_floating_point():
        scale = torch.tensor([], dtype=dtype).element_size() / capture.grad.element_size()
    data = (capture.nbytes() + capture.grad.numel() * capture.grad.element_size()) * scale
    need = int(data * 1.05) + (64 << 10)  # + HDF5 metadata (a few KiB per layer)
    free = _free_bytes(path.parent)
    if free is not None and need > free:
        raise StoreError(
            f"{path}: cannot write the checkpoint: the disk is full ({need / 2**20:.1f} MiB needed, "
            f"{free / 2**20:.1f} MiB free on {path.parent})"
        )
    return need


_FALLOC_FL_KEEP_SIZE = 1


def _fallocate_keep_size(fd: int, offset: int, length: int) -> int:
    """Linux ``fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)``: 0, or the errno (ENOSYS
    where there is no such call)."""
    import ctypes
    import errno as _errno
    import sys

    if not sys.platform.startswith("linux"):
        return _errno.ENOSYS
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):  # pragma: no cover
        return _errno.ENOSYS
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return 0 if fn(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0 else ctypes.get_errno()


def _reserve_fd(fd: int, path: Path, need: int) -> bool:
    """Allocate ``need`` bytes past the end of the open file ``fd`` (its size unchanged), so that
    HDF5's writes of the checkpoint cannot meet a full disk half-way (another process filling it
    after the free-space check): the disk-full case is then refused here, before HDF5 writes
    anything, with one line. ``False`` where the file system cannot reserve (the check stands)."""
    import errno as _errno

    code = _fallocate_keep_size(fd, os.fstat(fd).st_size, need)
    if code in (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG):
        free = _free_bytes(path.parent)
        raise StoreError(
            f"{path}: cannot write the checkpoint: {_os_cause(OSError(code, os.strerror(code)))}; "
            f"{need / 2**20:.1f} MiB needed"
            + (f", {free / 2**20:.1f} MiB free on {path.parent}" if free is not None else "")
            + "; checkpoints committed before are intact"
        )
    return code == 0


def _reserve(path: Path, need: int) -> bool:
    """:func:`_reserve_fd` on ``path`` (an existing file about to be appended to); ``False``
    when it cannot be opened for writing (the HDF5 open then reports why, in one line)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        return _reserve_fd(fd, path, need)
    finally:
        os.close(fd)


def _release(path: Path | int) -> None:
    """Give back what :func:`_reserve` allocated and HDF5 did not use (a truncation to the
    file's own size frees the blocks past its end)."""
    try:
        if isinstance(path, int):
            os.ftruncate(path, os.fstat(path).st_size)
        else:
            os.truncate(path, path.stat().st_size)
    except OSError:  # pragma: no cover - read-only or gone: nothing to give back
        pass


def _lock_partial(path: Path, partial: Path) -> int:
    """Create or take over ``partial`` under an exclusive ``flock`` held until the new file is
    published; a live concurrent creator holds it, so the loser gets a one-line error."""
    import fcntl

    for _ in range(5):
        try:
            fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StoreError(f"{path}: cannot create {partial.name}: {_os_cause(err) or _first_line(err)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(
                f"{path}: another process is creating this file ({partial.name} is locked); "
                "run one writer per file, or wait for it and append"
            ) from None
        try:  # the name may have been unlinked or replaced before we got the lock: retry
            same = os.stat(partial).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise StoreError(f"{path}: {partial.name} keeps changing under concurrent writers; retry")  # pragma: no cover


def _publish(partial: Path, path: Path) -> bool:
    """Move ``partial`` to ``path`` without ever replacing a file: ``False`` when ``path`` exists."""
    try:
        os.link(partial, path)
    except FileExistsError:
        return False
    except OSError:  # file systems without hard links: a rename after a check
        if path.exists():
            return False
        os.rename(partial, path)
        return True
    os.unlink(partial)
    return True


def _create(
    path: Path,
    run: dict,
    capture: Capture,
    checkpoint: str | None,
    step: int | None,
    batch_indices: list[int] | None,
    compression: str | None,
    dtype: torch.dtype | None,
    fsync: bool,
    need: int = 0,
) -> bool:
    """Write a new file with its first checkpoint through ``<path>.partial`` (exclusively locked,
    ``need`` bytes reserved) and publish it. ``False`` when another writer published ``path``
    first: append instead."""
    partial = path.with_name(path.name + ".partial")
    name = _check_name(checkpoint if checkpoint is not None else "checkpoint-0")
    fd = _lock_partial(path, partial)
    published = False
    try:
        if path.exists():  # another creator finished between our check and the lock
            return False
        with h5py.File(partial, "w", libver=_LIBVER, locking=False) as f:
            if need:
                _reserve_fd(fd, path, need)  # (a disk-full refusal here unlinks the partial file)
            f.attrs["format"] = FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["fisherlab_version"] = _version()
            f.attrs["created"] = _now()
            for k, v in run.items():
                f.attrs[k] = v
            _seal(f)
            f.create_group("checkpoints")
            f.create_group("staging")
            _write_checkpoint(f, partial, capture, name, step, batch_indices, compression, dtype, fsync)
        if need:
            _release(fd)
        if fsync:
            _fsync(partial)
        published = _publish(partial, path)
        if fsync:
            _fsync_dir(path.parent)
        return published
    finally:
        if not published:
            try:  # ours (we hold the lock on this inode)
                if os.stat(partial).st_ino == os.fstat(fd).st_ino:
                    partial.unlink()
            except OSError:
                pass
        os.close(fd)


def _fresh_staging(f: h5py.File, path: Path, why: BaseException) -> Any:
    """Move the whole ``/staging`` group aside (``/.stale-staging-<n>``) and start a new one: the
    recovery when a kill inside a commit left staging metadata that can no longer be edited."""
    n = 0
    while f"{_STALE}staging-{n}" in f:
        n += 1
    try:
        f.move("staging", f"{_STALE}staging-{n}")
        staging = f.create_group("staging")
    except Exception as err:
        raise StoreError(
            f"{path}: cannot remove the incomplete checkpoint left by a killed writer ({_first_line(why)}) "
            f"nor move it aside ({_first_line(err)}); copy the complete checkpoints out with h5copy or h5repack"
        ) from None
    f.flush()
    return staging


def _fresh_checkpoints(f: h5py.File, path: Path, drop: str, why: BaseException) -> Any:
    """A new ``/checkpoints`` holding hard links to every readable checkpoint of the old one but
    ``drop``, the old one kept as ``/.stale-checkpoints-<n>``: the recovery when a writer killed
    inside its commit's flush left a link in ``/checkpoints`` that HDF5 can neither delete nor
    move ('message not aligned'). The committed checkpoints' data are not touched."""
    n = 0
    while f"{_STALE}checkpoints-{n}" in f:
        n += 1
    tmp = f"{_STALE}checkpoints-new"
    try:
        if tmp in f:
            del f[tmp]
        old, new = f["checkpoints"], f.create_group(tmp)
        for k in _safe_keys(old):
            if k == drop or k.startswith(_STALE):
                continue
            try:
                new[k] = old[k]  # a second hard link to the same group
            except Exception:  # unreadable: stays in the stale group only
                continue
        f.move("checkpoints", f"{_STALE}checkpoints-{n}")
        f.move(tmp, "checkpoints")
    except Exception as err:
        raise StoreError(
            f"{path}: cannot replace the damaged checkpoint '{drop}' ({_first_line(why)}) nor rebuild "
            f"/checkpoints ({_first_line(err)}); copy the complete checkpoints out with h5copy or h5repack"
        ) from None
    f.flush()
    return f["checkpoints"]


def _clear_staging(f: h5py.File, path: Path) -> None:
    """Unlink what killed writers left in ``/staging`` (unreachable from any checkpoint).

    A staging group whose metadata a crash left unreadable may refuse to be deleted; its link is
    then renamed ``.stale-<name>-<n>`` (hidden from listings) so that the name can be reused, and
    when even that fails (a kill inside the commit's flush), the whole ``/staging`` group is moved
    aside to ``/.stale-staging-<n>`` and a fresh one started.
    """
    if "staging" not in f:
        f.create_group("staging")
    staging = f["staging"]
    try:
        olds = list(staging.keys())
    except Exception as err:
        _fresh_staging(f, path, err)
        return
    for old in olds:
        if old.startswith(_STALE):
            continue
        try:
            del staging[old]
        except Exception as err:
            n = 0
            while f"{_STALE}{old}-{n}" in staging:
                n += 1
            try:
                staging.move(old, f"{_STALE}{old}-{n}")
            except Exception:
                _fresh_staging(f, path, err)
                return
    f.flush()


def _run_attrs(capture: Capture) -> dict:
    try:
        model = _jdump(capture.model)
    except (TypeError, ValueError) as err:
        raise StoreError(f"capture.model must be JSON-able (no NaN): {_first_line(err)}") from None
    return {
        "layout": _jdump(capture.layout.to_json()),
        "model": model,
        "loss": str(capture.loss),
        "fisher": FisherMode(capture.fisher).value,
        "n_vectors": int(capture.K),
        "batch_size": int(capture.B),
    }


def _check_run(f: h5py.File, path: Path, run: dict) -> None:
    """Refuse to append a capture whose configuration differs from the run's."""
    labels = {"layout": "layout", "model": "model description", "loss": "loss", "fisher": "fisher mode",
              "n_vectors": "K (vectors per example)", "batch_size": "batch size"}
    for key, label in labels.items():
        have = _attr(f, key)
        want = run[key]
        if key in ("layout", "model"):
            same = have is not None and json.loads(have) == json.loads(want)
            shown_have, shown_want = "", ""
        else:
            same = have == want
            shown_have, shown_want = f" {have!r}", f" {want!r}"
        if not same:
            raise StoreError(
                f"{path}: cannot append: the capture's {label}{shown_want} differs from the run's{shown_have} "
                "(one file per run; write to another file)"
            )


def _chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...] | None:
    if not shape or 0 in shape:
        return None
    row = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    rows = max(1, min(shape[0], _CHUNK_BYTES // max(row, 1)))
    return (rows, *shape[1:])


def _write_ds(
    g: Any, key: str, arr: np.ndarray, compression: str | None, chunked: bool, pool: ThreadPoolExecutor, where: str
) -> None:
    """Write one dataset and its ``crc32`` attribute. The CRC and the NaN/Inf check run in ``pool``
    while HDF5 writes (``zlib.crc32`` and numpy's sum release the GIL): checks almost for free."""
    arr = np.ascontiguousarray(arr)
    crc_job = pool.submit(_crc, arr)
    bad_job = pool.submit(_count_non_finite, arr)
    kw: dict[str, Any] = {}
    chunks = _chunks(arr.shape, arr.itemsize) if (chunked or compression) else None
    if chunks is not None:
        kw["chunks"] = chunks
        if compression is not None:
            kw["compression"] = compression
    ds = g.create_dataset(key, shape=arr.shape, dtype=arr.dtype, **kw)
    if arr.size:
        ds.write_direct(arr)
    crc, bad = crc_job.result(), bad_job.result()
    if bad:
        raise NonFiniteError(f"{where}: {bad} non-finite value(s) (NaN/Inf) in {key}; not saved")
    ds.attrs["crc32"] = np.int64(crc)


def _hook(name: str, stage: str) -> None:
    if _WRITE_HOOK is not None:
        _WRITE_HOOK(name, stage)


def _write_checkpoint(
    f: h5py.File,
    path: Path,
    capture: Capture,
    name: str,
    step: int | None,
    batch_indices: list[int] | None,
    compression: str | None,
    dtype: torch.dtype | None,
    fsync: bool,
) -> None:
    """Stage, checksum, flush, move to ``/checkpoints/<name>``, mark complete, flush."""
    staging = f["staging"] if "staging" in f else f.create_group("staging")
    try:
        g = staging.create_group(name)
    except (KeyError, OSError, RuntimeError) as err:  # damaged staging metadata (a kill in a commit)
        if _os_cause(err) is not None:
            raise
        staging = _fresh_staging(f, path, err)
        g = staging.create_group(name)
    f.flush()  # the attempt is visible as "incomplete" from here on
    _hook(name, "staged")
    out_dtype = dtype
    cast = lambda t: _to_numpy(t, out_dtype)  # noqa: E731
    float_dtype = str(out_dtype or capture.grad.dtype).replace("torch.", "")
    meta = {k: v for k, v in capture.meta.items() if k not in ("checkpoint", "step", "batch_indices")}
    try:
        meta_json = _jdump(meta)
    except (TypeError, ValueError) as err:
        raise StoreError(f"capture.meta must be JSON-able (no NaN): {_first_line(err)}") from None
    attrs = {
        "name": name,
        "step": _jdump(step),
        "batch_indices": _jdump(batch_indices),
        "seed": _jdump(capture.seed),
        "loss_value": float(capture.loss_value),
        "loss": str(capture.loss),
        "fisher": FisherMode(capture.fisher).value,
        "batch_size": int(capture.B),
        "n_vectors": int(capture.K),
        "dtype": float_dtype,
        "meta": meta_json,
        "layers": _jdump(_layer_table(capture)),
        "created": _now(),
        "fisherlab_version": _version(),
    }
    if isinstance(capture.meta.get("sample"), dict) and int(f.attrs.get("schema_version", 1)) >= 2:
        attrs["sample"] = _jdump(capture.meta["sample"])
    for k, v in attrs.items():
        g.attrs[k] = v
    try:
        nbytes = 0
        layers = g.create_group("layers")
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="fisherlab-check") as pool:
            for i, lc in enumerate(capture.layers):
                lg = layers.create_group(str(i))
                lg.attrs["name"] = lc.spec.name
                lg.attrs["kind"] = lc.spec.kind.value
                lg.attrs["storage"] = lc.storage.value
                lg.attrs["positions"] = int(lc.positions)
                for key, t in _layer_arrays(lc).items():
                    arr = cast(t)
                    _write_ds(lg, key, arr, compression, chunked=True, pool=pool, where=f"capture layer {i} '{lc.spec.name}'")
                    nbytes += arr.nbytes
                    _hook(name, f"{i}/{key}")
            for key, t in (("grad", capture.grad), ("targets", capture.targets), ("sampled", capture.sampled)):
                if t is not None:
                    arr = cast(t)
                    _write_ds(g, key, arr, compression, chunked=False, pool=pool, where="capture")
                    nbytes += arr.nbytes
    except NonFiniteError:
        del staging[name]  # nothing of it may remain
        f.flush()
        raise
    g.attrs["nbytes"] = int(nbytes)
    for i in range(len(capture.layers)):
        _seal(layers[str(i)])
    _seal(g)
    _hook(name, "before-commit")
    f.flush()
    if fsync:
        _fsync(path)
    ckpts = f["checkpoints"]
    if name in ckpts:  # incomplete, or complete with overwrite=True
        try:
            del ckpts[name]
        except (KeyError, OSError, RuntimeError) as err:
            if _os_cause(err) is not None:
                raise
            n = 0
            while f"{_STALE}checkpoint-{name}-{n}" in f:
                n += 1
            try:
                f.move(f"checkpoints/{name}", f"{_STALE}checkpoint-{name}-{n}")
            except (KeyError, OSError, RuntimeError, ValueError) as err2:
                if _os_cause(err2) is not None:
                    raise
                ckpts = _fresh_checkpoints(f, path, name, err2)
    f.move(f"staging/{name}", f"checkpoints/{name}")
    _hook(name, "moved")
    ckpts[name].attrs["complete"] = True
    _hook(name, "completed")
    f.flush()
    if fsync:
        _fsync(path)
    _hook(name, "committed")
