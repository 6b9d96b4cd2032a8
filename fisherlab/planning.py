"""Memory plans: the big allocations of an analysis, counted before anything is computed.

``compare(..., memory="8GiB")`` (CLI ``--memory 8GiB``) plans, from the Jacobian's shapes alone:

| stage | bytes (float64) | kept |
|---|---|---|
| the Jacobian's factors / dense rows | Σ_i numel · 8 | resident |
| per-layer Grams K_i, K, its eigenvectors W, the Woodbury Cholesky (Woodbury path only) | (ℓ + 3)·N²·8 | resident |
| a conv layer's Gram temporaries: dense rows ``N × p_i`` or the ``(N·T)²`` pair Gram | max over layers | transient |
| KFAC factors and eigenbases | Σ_i 2·(d_in'² + d_out²)·8 | resident |
| p-sized vectors (∇h, ζ, ζ_KFAC, a method's increment and error, temporaries) | 8·p·8 | resident |
| Lanczos / SLQ bases ``[c, m, p]`` (spectra) | c·m·p·8 | transient |
| U rotated into KFAC's eigenbasis (spectra's preconditioned operator) | Σ_i numel · 8 (streamed: one layer) | resident (transient) |

A plan whose peak (resident + the largest transient) exceeds the budget is refused with one line
naming the flag (:class:`~fisherlab.errors.MemoryBudgetError`); a Lanczos/SLQ basis is sized to
what the budget leaves (:func:`slq_steps_within`). The counts are the allocations fisherlab makes
itself — torch's allocator, the capture in float32 and the interpreter come on top — so leave a
margin (the planner refuses at 100 % of the budget).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import MemoryBudgetError
from .jacobian import _MAX_TEMP_NUMEL, Jacobian, LayerJacobian, MixedLayerJacobian, StreamedLayerJacobian, _Slot, conv_gram_path
from .operators.exact import GRAM_BUDGET_BYTES

__all__ = ["parse_bytes", "Stage", "Plan", "plan_compare", "plan_spectra", "slq_steps_within", "MIN_SLQ_STEPS",
           "FileJacobian", "jacobian_from_file"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

MIN_SLQ_STEPS = 8
"""Fewest Lanczos steps per probe a budget-sized SLQ may run (fewer: refused)."""


def parse_bytes(memory: int | float | str) -> int:
    """Bytes from ``8589934592``, ``"8GiB"``, ``"512 MiB"``, ``"16GB"`` (a one-line error otherwise)."""
    if isinstance(memory, bool):
        raise MemoryBudgetError(f"memory must be bytes or a size like '8GiB', got {memory!r}")
    if isinstance(memory, (int, float)):
        value = float(memory)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(memory))
        if not m or m.group(2).lower() not in _UNITS:
            raise MemoryBudgetError(f"memory must be bytes or a size like '8GiB', '512MiB', '16GB', got {memory!r}")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(value) or value <= 0:
        raise MemoryBudgetError(f"memory must be a positive size, got {memory!r}")
    return int(value)


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


@dataclass(frozen=True)
class Stage:
    """One planned allocation: ``name``, ``bytes``, ``resident`` (kept to the end) or transient."""

    name: str
    bytes: int
    resident: bool = True


@dataclass
class Plan:
    """The planned allocations of one analysis against ``budget`` bytes.

    ``peak`` = Σ resident + the largest transient; :meth:`check` refuses a plan over budget.
    """

    what: str
    budget: int
    stages: list[Stage] = field(default_factory=list)

    @property
    def resident(self) -> int:
        return sum(s.bytes for s in self.stages if s.resident)

    @property
    def peak(self) -> int:
        return self.resident + max((s.bytes for s in self.stages if not s.resident), default=0)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    @property
    def largest(self) -> Stage:
        return max(self.stages, key=lambda s: s.bytes)

    def check(self) -> "Plan":
        """This plan; a one-line :class:`MemoryBudgetError` naming ``--memory`` when it does not fit."""
        if not self.fits:
            big = self.largest
            raise MemoryBudgetError(
                f"{self.what} needs ~{_gib(self.peak)} but the memory budget is {_gib(self.budget)} "
                f"(largest: {big.name}, {_gib(big.bytes)}); raise --memory (memory=) or use a smaller batch"
            )
        return self

    def table(self) -> str:
        """The stages, one per line, with the peak and the budget."""
        lines = [f"{s.name:<58} {_gib(s.bytes):>12} {'resident' if s.resident else 'transient'}" for s in self.stages]
        lines.append(f"{'peak':<58} {_gib(self.peak):>12} of {_gib(self.budget)}")
        return "\n".join(lines)


def _woodbury(jac: Jacobian) -> bool:
    """The ``solver="auto"`` rule of :class:`~fisherlab.operators.ExactFisher` (Woodbury or CG)."""
    N, p = jac.N, jac.p
    return (N * N * 8 <= GRAM_BUDGET_BYTES and N < p) or N <= 2048


def _jacobian_numel(lj: LayerJacobian) -> int:
    """Numbers of a layer's Jacobian (from its shapes: nothing is read): factors ā, g or rows J.
    Also those of the layer rotated into KFAC's eigenbasis (:meth:`LayerJacobian.rotated`; at most:
    a null space of A it leaves out is not known from the shapes)."""
    if lj.factored:
        return lj.B * lj.T * lj.spec.d_in_bar + lj.N * lj.T * lj.spec.d_out
    return lj.N * lj.p


def _layer_numel(lj: LayerJacobian) -> int:
    """Numbers a layer holds: its Jacobian (:func:`_jacobian_numel`), and a dense layer's A, G."""
    return _jacobian_numel(lj) + (0 if lj.factored else lj.spec.d_in_bar ** 2 + lj.spec.d_out ** 2)


def _gram_temporary(lj: LayerJacobian, item: int) -> tuple[int, str]:
    """The transient bytes of a conv layer's Gram (:meth:`FactoredLayerJacobian._compute_gram`)."""
    if not lj.factored or lj.T == 1:
        return 0, ""
    B, K, T, N = lj.B, lj.K, lj.T, lj.N
    d_in, d_out = lj.spec.d_in_bar, lj.spec.d_out
    if conv_gram_path(B, K, T, d_in, d_out) == "dense":  # in slices of output channels
        step = min(d_out, max(1, _MAX_TEMP_NUMEL // max(N * d_in, 1)))
        return 2 * N * d_in * step * item, f"dense rows N × p_i (in slices) of '{lj.spec.name}' for its Gram"
    return ((B * T) ** 2 + 2 * (N * T) ** 2) * item, f"(N·T)² pair Grams of '{lj.spec.name}'"


def _base_stages(jac: Jacobian, vectors: int, *, streamed: bool = False) -> list[Stage]:
    """The big allocations, from the shapes alone. ``streamed``: the layers are read from the file
    one at a time (:class:`~fisherlab.jacobian.StreamedLayerJacobian`): one layer's arrays in
    float64 and its stored float32 copy are transient instead of every layer resident."""
    N, p = jac.N, jac.p
    item = 8
    held = sum(_layer_numel(lj) * torch.finfo(lj.result_dtype if not isinstance(lj, MixedLayerJacobian) else torch.float32).bits // 8
               for lj in jac.layers)
    if streamed:
        big = max(jac.layers, key=_layer_numel)
        stages = [Stage(f"one layer read from the file ('{big.spec.name}', float64 + its float32 copy)",
                        _layer_numel(big) * (item + 4), resident=False)]
    else:
        stages = [Stage("Jacobian factors / dense rows", held)]
    if _woodbury(jac):
        stages.append(Stage(f"N × N Grams K_i (ℓ = {len(jac.layers)}), K, eigh, Cholesky (N = {N:,})",
                            (len(jac.layers) + 3) * N * N * item))
        temp, name = max((_gram_temporary(lj, item) for lj in jac.layers), default=(0, ""))
        if temp:
            stages.append(Stage(name, temp, resident=False))
    stages.append(Stage("KFAC factors and eigenbases",
                        sum(2 * (lj.spec.d_in_bar ** 2 + lj.spec.d_out ** 2) * item for lj in jac.layers)))
    stages.append(Stage(f"{vectors} p-sized vectors (p = {p:,})", vectors * p * item))
    return stages


def plan_compare(jac: Jacobian, methods: Sequence[str] = (), *, memory: int | str, streamed: bool | None = None) -> Plan:
    """The plan of :func:`fisherlab.compare` on ``jac`` (``methods`` for the message only);
    ``streamed``: with the layers read from the file one at a time (default: whether ``jac``'s
    layers are :class:`~fisherlab.jacobian.StreamedLayerJacobian`)."""
    if streamed is None:
        streamed = any(isinstance(lj, StreamedLayerJacobian) for lj in jac.layers)
    what = f"compare ({len(methods)} methods)" if methods else "compare"
    if streamed:
        what += ", streaming the layers from the file,"
    return Plan(what, parse_bytes(memory), _base_stages(jac, vectors=8, streamed=streamed))


def slq_steps_within(free: int, p: int, n_steps: int, *, itemsize: int = 8) -> int:
    """The Lanczos steps per probe (≤ ``n_steps``) whose basis ``[m, p]`` fits ``free`` bytes."""
    return max(0, min(n_steps, p, free // max(p * itemsize, 1)))


def plan_spectra(jac: Jacobian, *, memory: int | str, n_steps: int,
                 operators: Sequence[str] = ("fisher", "kfac", "preconditioned")) -> tuple[Plan, int]:
    """The plan of :func:`fisherlab.spectra.spectra` of ``operators`` and the SLQ/Lanczos basis
    bytes it leaves: refused when fewer than :data:`MIN_SLQ_STEPS` steps of one probe fit. A
    Jacobian of :class:`~fisherlab.jacobian.StreamedLayerJacobian` layers is planned streamed.
    The ``"preconditioned"`` operator holds U rotated into KFAC's eigenbasis
    (:func:`fisherlab.operators.derived.rotated_jacobian`): a second Jacobian in memory, or, streamed,
    each layer rotated as it is read."""
    streamed = any(isinstance(lj, StreamedLayerJacobian) for lj in jac.layers)
    plan = Plan("spectra" + (", streaming the layers from the file," if streamed else ""), parse_bytes(memory),
                _base_stages(jac, vectors=8, streamed=streamed))
    if "preconditioned" in operators:
        if streamed:
            big = max(jac.layers, key=_jacobian_numel)
            plan.stages.append(Stage(f"one layer rotated into KFAC's eigenbasis as it is read ('{big.spec.name}')",
                                     _jacobian_numel(big) * 8, resident=False))
        else:
            plan.stages.append(Stage("U rotated into KFAC's eigenbasis (preconditioned operator)",
                                     sum(_jacobian_numel(lj) for lj in jac.layers) * 8))
    free = plan.budget - plan.peak
    m = slq_steps_within(max(free, 0), jac.p, n_steps)
    need = min(MIN_SLQ_STEPS, n_steps, jac.p)
    plan.stages.append(Stage(f"one Lanczos basis ({max(m, need)} steps × p)", max(m, need) * jac.p * 8, resident=False))
    plan.check()
    return plan, max(free, 0)


# ---- a checkpoint of a file, in memory or streamed ------------------------------------------------


@dataclass
class FileJacobian:
    """A checkpoint's :class:`~fisherlab.jacobian.Jacobian` as :func:`jacobian_from_file` chose
    to hold it, with what the drivers need besides: ``grad`` (∇h ``[p]``), ``sample`` (the
    sample's context), ``fingerprint`` (:meth:`fisherlab.store.CaptureFile.fingerprint`),
    ``streamed``, the ``plan`` (``None`` without a budget) and ``close()`` (the file handles of a
    streamed Jacobian)."""

    jac: Jacobian
    grad: Tensor
    sample: dict
    fingerprint: str
    streamed: bool
    plan: Plan | None = None
    _files: list = field(default_factory=list)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()
        for lj in self.jac.layers:
            if isinstance(lj, StreamedLayerJacobian):
                lj.slot.clear()


def _streamed_skeleton(path, info, layout, loss: str | None, *, device, precision: str, files: list) -> Jacobian:
    """A Jacobian of :class:`StreamedLayerJacobian` layers reading ``info``'s layers from ``path``
    (each layer's CRC-32 checked on its first read: :meth:`fisherlab.store.CaptureFile.layer_reader`)."""
    from .store import CaptureFile

    cf = CaptureFile(path)
    files.append(cf)
    reader: list = []

    def read(i: int):
        if not reader:
            reader.append(cf.layer_reader(info.name))
        return reader[0](i)

    B, K = int(info.batch_size), int(info.n_vectors)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    slot = _Slot()

    def loader(i: int):
        def load() -> LayerJacobian:
            lc = read(i)
            if precision == "mixed":
                cv = [None if t is None else t.to(device=dev, dtype=torch.float32) for t in (lc.a, lc.g, lc.dense, lc.A, lc.G)]
                return MixedLayerJacobian(lc.spec, B, K, *cv, out_dtype=torch.float64)
            return LayerJacobian.from_layer_capture(lc, B, K, torch.float64, dev)
        return load

    layers = [StreamedLayerJacobian(spec, B, K, loader(i), T=int(li.positions), factored=li.storage != "dense",
                                    device=dev, dtype=torch.float64, slot=slot)
              for i, (spec, li) in enumerate(zip(layout.layers, info.layers))]
    targets = next((d for d in info.datasets if d.name == "targets"), None)
    terms = int(np.prod(targets.shape[1:])) if targets is not None and len(targets.shape) > 1 else None
    return Jacobian(layout, layers, B, K, loss=loss, output_terms=terms)


def jacobian_from_file(path, checkpoint: str, *, methods: Sequence[str] = (), memory: int | str | None = None,
                       device: torch.device | str | None = None, precision: str = "float64", what: str = "compare",
                       stream: bool | None = None) -> FileJacobian:
    """The Jacobian of one checkpoint of a capture file, held as the memory budget allows.

    Without a budget, or when the in-memory plan (:func:`plan_compare`, plus the stored float32
    capture while it is converted) fits ``memory``, the checkpoint is loaded and converted once.
    Otherwise the layers are streamed (:class:`~fisherlab.jacobian.StreamedLayerJacobian`: read
    from the file, one layer at a time, whenever a product or a Gram needs them; every number
    equals the in-memory path's); when even that plan does not fit, one line naming ``--memory``
    is raised (:class:`~fisherlab.errors.MemoryBudgetError`) before anything is read.
    ``stream=True``/``False`` forces the choice (``False``: refused if the in-memory plan does
    not fit).
    """
    from .store import CaptureFile, load

    with CaptureFile(path) as cf:
        info = cf.info(checkpoint)
        layout = cf.layout
        loss = cf.run["loss"]
        fingerprint = cf.fingerprint(checkpoint)
    files: list = []
    skel = _streamed_skeleton(path, info, layout, loss, device=device, precision=precision, files=files)
    plan = None
    streamed = bool(stream)
    if memory is not None:
        mem = plan_compare(skel, methods, memory=memory, streamed=False)
        stored = sum(_layer_numel(lj) for lj in skel.layers) * 4
        mem.stages.append(Stage("the stored capture (float32) while it is converted", stored, resident=False))
        mem.what = what
        if stream is None:
            streamed = not mem.fits
        plan = mem
        if streamed:
            plan = plan_compare(skel, methods, memory=memory, streamed=True)
            plan.what = f"{what}, streaming the layers from the file,"
        plan.check()
    if streamed:
        grad = files[0].read_grad(checkpoint)
        return FileJacobian(skel, grad, dict(info.sample or {}), fingerprint, True, plan, files)
    for f in files:
        f.close()
    cap = load(path, checkpoint)
    jac = Jacobian.from_capture(cap, device=device, precision=precision)
    return FileJacobian(jac, cap.grad, dict(cap.meta.get("sample", {})), fingerprint, False, plan)
