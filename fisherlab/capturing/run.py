"""The capture entry point: one forward pass, K + 1 backward passes to the layer outputs.

For a batch ``(x_b, y_b)`` of size B, per layer i we record the inputs ā_{b,t} (forward hook,
unfolded for Conv2d, bias column appended) and the derivatives g_{b,k,t} of the k-th
backpropagated output vector e_{b,k} with respect to the layer output (MATH.md §2, table):

* ``mc``: e_{b,k} = ∂_z L(ŷ_{b,k}, z_b)/√K with ŷ_{b,k} ~ p(y | z_b);
* ``exact``: e_{b,k} = S_b[:, k] with S_b S_bᵀ = ∂²_z L, K = d_y;
* ``empirical``: e_{b,1} = ∂_z L(y_b, z_b).

Backpropagating ``e`` directly (no loss reduction) makes g per example, not divided by B.
Gradients are taken with respect to the layer outputs only, never the parameters, which is
cheaper than a plain backward. One more backward with the true labels gives ∇h (2.10).
"""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from .._system import available_memory
from ..errors import ConfigError, MemoryBudgetError, NonFiniteError, UnsupportedLayerError
from ..layout import LayerKind, LayerSpec, Layout, check_batchnorm, layer_modules
from . import losses as L
from .layers import (
    batchnorm_normalized,
    conv_gradient_block,
    conv_input_moment,
    conv_rows,
    dense_from_factors,
    layer_inputs,
    layer_output_grads,
)
from .record import (
    Capture,
    FisherMode,
    LayerCapture,
    Storage,
    choose_storage,
    kfac_factors_from,
)

__all__ = ["capture", "NonFiniteError", "default_device"]


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _fisher(fisher: str | FisherMode) -> FisherMode:
    try:
        return FisherMode(fisher)
    except ValueError:
        raise ValueError(
            f"unknown fisher mode '{fisher}' (choose one of {', '.join(m.value for m in FisherMode)})"
        ) from None


@contextmanager
def _prepared(model: nn.Module, layout: Layout) -> Iterator[None]:
    """Eval mode (BatchNorm statistics, no dropout) and gradients enabled on the layers; every
    submodule's own train/eval flag is restored exactly afterwards (a frozen BatchNorm inside a
    training model stays frozen)."""
    modes = [(m, m.training) for m in model.modules()]
    modules = layer_modules(model, layout)
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters(recurse=False)]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, f in flags:
            p.requires_grad_(f)


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"unknown device {device!r} ({str(err).splitlines()[0]})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} requested but CUDA is not available here; use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(device)!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _refuse_batch_statistics(model: nn.Module) -> None:
    """BatchNorm that normalizes by the batch even in eval mode couples the examples: the
    per-example gradients (and so the Fisher) would be wrong."""
    from torch.nn.modules.batchnorm import _BatchNorm

    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and (not m.track_running_stats or m.running_mean is None or m.running_var is None):
            raise UnsupportedLayerError(
                f"module '{name}' ({type(m).__name__}, track_running_stats=False) normalizes by the batch's "
                "statistics even in eval mode, which couples the examples: the per-example Fisher would be "
                "wrong; use track_running_stats=True (running statistics) or a per-example norm (GroupNorm, LayerNorm)"
            )


@contextmanager
def _training_statistics(model: nn.Module, on: bool) -> Iterator[list[str]]:
    """With ``on``: the BatchNorm modules in train mode normalise by the batch's statistics during
    the (eval-mode) capture, as the training forward does, without updating their running
    averages (their running statistics are hidden, then put back). Yields the names of the
    BatchNorm modules whose forward then uses batch statistics (none when ``on`` is false)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    hidden = []
    if on:
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.training and m.running_mean is not None:
                hidden.append((m, m.running_mean, m.running_var))
                m.running_mean = m.running_var = None
    try:
        yield [n for n, m in model.named_modules() if on and isinstance(m, _BatchNorm)
               and m.running_mean is None and m.running_var is None]
    finally:
        for m, mean, var in hidden:
            m.running_mean, m.running_var = mean, var


def _batchnorm_in_train_mode(model: nn.Module) -> list[str]:
    from torch.nn.modules.batchnorm import _BatchNorm

    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training]


def _names(names: list[str], at_most: int = 3) -> str:
    shown = ", ".join(map(repr, names[:at_most]))
    return shown if len(names) <= at_most else f"{shown}, … ({len(names)} modules)"


def _say_statistics(training: list[str], batch_statistics: bool, coupled: list[str], meta: dict) -> None:
    """One line at capture time on which BatchNorm statistics the capture used (README: BatchNorm):
    ``training`` are the BatchNorm modules in train mode, ``coupled`` those normalising by the batch."""
    if batch_statistics and coupled:
        meta["batch_statistics"] = True
        warnings.warn(
            f"fisherlab: capture with batch statistics (BatchNorm {_names(coupled)}): the examples "
            "are coupled, the per-example vectors are backpropagated ones and F is not a per-example Fisher; "
            "recorded as batch_statistics=true",
            UserWarning, stacklevel=3,
        )
    elif batch_statistics:
        warnings.warn(
            "fisherlab: batch_statistics=True, but no BatchNorm is in train mode: captured with the running "
            "statistics (the eval forward)", UserWarning, stacklevel=3,
        )
    elif training:
        warnings.warn(
            f"fisherlab: BatchNorm {_names(training)} in train mode captured in eval mode with "
            "the running statistics (a per-example Fisher, not the training forward; batch_statistics=True "
            "captures that one)", UserWarning, stacklevel=3,
        )


def _param_uses(z: Tensor) -> dict[int, int]:
    """How many autograd edges of ``z``'s graph lead into each leaf tensor (by ``id``)."""
    uses: dict[int, int] = {}
    seen: set = set()
    stack = [z.grad_fn] if z.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                uses[id(var)] = uses.get(id(var), 0) + 1
            elif nxt not in seen:
                stack.append(nxt)
    return uses


def _refuse_reuse(z: Tensor, layout: Layout, modules: list[nn.Module], outs_used: list[bool]) -> None:
    """Each captured parameter must reach the output through its own module call only: a weight
    also used functionally (a tied autoencoder's ``F.linear(h, enc.weight.t())``) or instead of
    the call gets gradients the hooks never see, and a silently wrong Fisher."""
    uses = _param_uses(z)
    for spec, m, used in zip(layout.layers, modules, outs_used):
        for pname, p in m.named_parameters(recurse=False):
            n = uses.get(id(p), 0)
            if n > 1 or (n == 1 and not used):
                raise UnsupportedLayerError(
                    f"parameter '{spec.name}.{pname}' is used outside its module's call in forward "
                    f"({n} use(s) in the graph, e.g. a tied weight F.linear(h, layer.weight.t()) or "
                    "F.linear(h, layer.weight)): its per-example gradients would be wrong; call the module "
                    "itself, or give the reused copy its own nn.Linear"
                )


_PER_EXAMPLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Identity,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.GroupNorm,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
)
"""Modules whose forward, in eval mode with running statistics, maps each example on its own and
deterministically (exact types: a subclass may override ``forward``)."""


def _per_example_by_construction(model: nn.Module) -> bool:
    """Whether ``model`` is, provably, one function per example: a plain ``nn.Sequential`` (nested
    ones too) of :data:`_PER_EXAMPLE_MODULES` only — ``Flatten``/``Unflatten`` only past the batch
    axis — with no forward hooks, neither on a module nor global. Such a model cannot couple
    examples nor draw random numbers in eval mode, so the capture skips its probe forward
    (:func:`_refuse_coupling`); any other model is probed."""
    from torch.nn.modules import module as module_mod

    if module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks:
        return False
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m):  # (a patched instance)
            return False
        kind = type(m)
        if kind is nn.Sequential or kind in _PER_EXAMPLE_MODULES:
            continue
        if kind is nn.Flatten and m.start_dim >= 1:
            continue
        if kind is nn.Unflatten and m.dim >= 1:
            continue
        return False
    return True


def _probe(work: nn.Module, x: Tensor, n: int) -> Tensor | None:
    """The outputs of the first ``n`` examples alone (no graph), or ``None`` where the model
    cannot run on fewer examples (a hard-coded batch size)."""
    try:
        with torch.no_grad():
            out = work(x[:n])
    except Exception:
        return None
    return out.reshape(n, -1) if isinstance(out, Tensor) and out.shape[:1] == (n,) else None


def _works_in_place(model: nn.Module) -> bool:
    """Whether a module of ``model`` is set to work in place (``inplace=True``: ReLU, Dropout, …)."""
    return any(getattr(m, "inplace", False) is True for m in model.modules())


def _refuse_coupling(probe: Tensor | None, z: Tensor, n: int, B: int) -> None:
    """Per-example outputs must not depend on the rest of the batch (batch statistics) nor change
    from one forward to the next (dropout hard-coded with ``training=True``)."""
    if probe is None:
        return
    ref = z[:n].detach()
    if probe.shape != ref.shape or not bool(torch.isfinite(ref).all() and torch.isfinite(probe).all()):
        return  # (non-finite outputs are reported by the NaN/Inf check)
    tol = (1e-7 if ref.dtype == torch.float64 else 1e-2) * max(1.0, float(ref.abs().max()))
    diff = float((probe - ref).abs().max()) if ref.numel() else 0.0
    if not diff <= tol:
        what = f"its other {B - n} examples are left out" if n < B else "the forward pass is repeated"
        raise UnsupportedLayerError(
            f"the model's outputs for the first {n} example(s) change when {what} (max difference "
            f"{diff:.3g}): the forward couples examples (batch statistics) or is random (dropout hard-coded "
            "with training=True), so the per-example Fisher would be wrong"
        )


def _budget(memory: int | float | None, device: torch.device) -> int | None:
    if memory is not None:
        if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not memory > 0:
            raise ConfigError(f"memory must be a positive number of bytes, got {memory!r}")
        return int(memory)
    return available_memory(device)


def _estimate(layout: Layout, positions: list[int], B: int, K: int, storage, itemsize: int) -> tuple[int, str]:
    """Bytes the capture will allocate after the forward pass (K backward results per layer, the
    stacked g, ā, dense rows and their einsum temporary), and the largest layer's share."""
    total, worst, worst_text = 0, -1, ""
    for spec, T in zip(layout.layers, positions):
        choice = storage.get(spec.name, "auto") if isinstance(storage, dict) else storage
        g = B * K * T * spec.d_out
        a = B * T * spec.d_in_bar
        n = 2 * g + a  # K backward results + their stack, ā
        if choose_storage(B, K, T, spec.d_in_bar, spec.d_out, choice) is Storage.DENSE:
            d = B * K * spec.numel
            n += 2 * d  # the einsum result and its contiguous CPU copy
            text = f"layer '{spec.name}': dense J [{B * K}, {spec.numel}] = {d * itemsize / 2**30:.3g} GiB"
        else:
            text = f"layer '{spec.name}': g [{B}, {K}, {T}, {spec.d_out}] = {g * itemsize / 2**30:.3g} GiB"
        total += n * itemsize
        if n > worst:
            worst, worst_text = n, text
    return total, worst_text


def _storage_value(v: object) -> Storage:
    try:
        return Storage(v)
    except ValueError:
        raise ConfigError(f"unknown storage {v!r} (choose one of {', '.join(m.value for m in Storage)})") from None


def _check_finite(t: Tensor, what: str) -> None:
    # One reduction first (NaN/Inf propagate into the sum); count exactly only when the sum is not
    # finite, which also lets a mere overflow of the sum pass. Much cheaper than isfinite().all().
    if math.isfinite(t.sum().item()):  # (a Python float: no isfinite op on a 0-dim tensor, ~10 µs each)
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise NonFiniteError(f"capture: {bad} non-finite value(s) (NaN/Inf) in {what}")


NARROW_PATCHES = 32
"""A Conv2d layer stored dense whose patches have at most this many numbers (c_in·k_h·k_w: the
small CNN's first conv, 1 × 5 × 5; ResNet-18's stem, 3 × 3 × 3) unfolds ā once and takes its rows,
A and ∇h block from it, as a dense Linear layer does: its weight backwards and shifted products
with one or three input channels cost more than the narrow unfold (66.7 → 46.9 ms for the small
CNN's first conv, 96.7 → 75.6 ms for ResNet-18's stem, B = 128; with 8 × 3 × 3 = 72 numbers the
unfold is already 1.4× slower)."""


def _dense_conv_layer(spec: LayerSpec, x: Tensor, out_shape: torch.Size, g_k: list[Tensor | None],
                      g_true: Tensor | None, block: Tensor, B: int, T: int) -> LayerCapture:
    """A Conv2d layer stored dense, from its input ``x [B, c_in, H, W]`` and output gradients
    (``out_shape = [B, d_out, H_o, W_o]`` per vector; ``None``: the layer does not reach the output; ``g_true``
    ``None``: the true-label gradients are the first vector's, as in the empirical mode), never
    unfolding ā: the rows by per-example weight backwards (:func:`conv_rows`), A by the input's
    shifted products (:func:`conv_input_moment`), the ∇h block (written into ``block``) by one weight
    backward (empirical: the sum of the rows). Equal to the unfolded path
    (tests/test_capture_conv_dense.py), which layers with narrow patches take instead
    (:data:`NARROW_PATCHES`)."""
    go = [x.new_zeros(out_shape) if t is None else t for t in g_k]
    go = go[0].unsqueeze(1) if len(go) == 1 else torch.stack(go, dim=1)  # [B, K, d_out, H_o, W_o]
    gt = go[:, 0] if g_true is None else g_true
    _check_finite(x, f"the inputs ā of layer '{spec.name}'")
    _check_finite(go, f"the output gradients g of layer '{spec.name}'")
    if g_true is not None:
        _check_finite(gt, f"the true-label gradient of layer '{spec.name}'")
    rows = conv_rows(spec, x, go)
    if g_true is None and go.shape[1] == 1:  # empirical: the rows are the true-label gradients
        torch.div(rows.view(B, spec.d_in_bar, spec.d_out).sum(0), B, out=block)
    else:
        torch.div(conv_gradient_block(spec, x, gt), B, out=block)
    A = conv_input_moment(spec, x) / B
    gf = layer_output_grads(spec, go, lead=2).reshape(-1, spec.d_out)
    G = gf.T @ gf / (B * T)
    dtype = block.dtype
    return LayerCapture(spec, T, dense=rows.to("cpu", dtype), A=A.to("cpu", dtype), G=G.to("cpu", dtype))


def capture(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss: str,
    fisher: str,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    storage: str | dict[str, str] = "auto",
    model_description: dict | None = None,
    meta: dict | None = None,
    memory: int | None = None,
    batch_statistics: bool = False,
    batchnorm: str = "outside",
) -> Capture:
    """Record per-example layer Jacobians of one mini-batch (MATH.md §2).

    Args:
        model: a network whose ``nn.Linear``/``nn.Conv2d`` layers enter the Fisher; other modules
            with parameters are listed in a warning and left out. **The capture switches the
            model to eval mode** (BatchNorm uses its running statistics, dropout is off) and
            restores every submodule's own train/eval flag afterwards; the model is copied only
            when ``device``/``dtype`` differ. In-place operations after a captured layer
            (``ReLU(inplace=True)``, ``out += identity``) are handled: a forward of the first
            examples detects them, and the forward of the batch copies the tensors they would
            overwrite.
        inputs: ``[B, ...]`` network inputs.
        targets: true targets: class indices ``[B]`` (``cross_entropy``; ``[B, T]``: one per
            position of a sequence model's ``[B, T, V]`` outputs, the loss summed over positions)
            or ``[B, d_y]``.
        loss: ``"cross_entropy"``, ``"mse"`` (½‖y−z‖²) or ``"bce_logits"``; the model output is
            flattened to ``z [B, d_y]``.
        fisher: ``"mc"``, ``"exact"`` or ``"empirical"`` (:class:`FisherMode`).
        n_samples: K for ``mc`` (ignored otherwise: ``exact`` has K = d_y, ``empirical`` K = 1).
        generator: CPU generator for the ``mc`` draws; its ``initial_seed()`` is recorded. A fresh
            seeded one is made when ``None``.
        device: where to compute; ``None`` picks CUDA when available.
        dtype: compute and storage dtype (default float32; float64 on request).
        storage: ``"auto"`` (factored unless dense ``[N, p_i]`` is smaller), ``"factored"``,
            ``"dense"``, or a dict ``{layer name: storage}`` overriding ``auto`` per layer.
        model_description: JSON-able description kept in the capture (and the HDF5 file).
        meta: further JSON-able metadata (checkpoint, step, batch indices, …).
        memory: the bytes the capture may allocate after the forward pass (default: the memory
            available on ``device``); a capture estimated to need more is refused before it
            allocates, naming the size and the largest layer.
        batch_statistics: capture the training forward of BatchNorm (below).
        batchnorm: ``"outside"`` (default): BatchNorm parameters are left out of the Fisher and
            listed; ``"fisher"``: the affine parameters ``[γ; β]`` of every ``BatchNorm1d/2d/3d``
            join it as a layer of kind ``batchnorm`` (ā = [1], g = the per-example gradient row
            w.r.t. ``[γ; β]``, :mod:`fisherlab.layout`), so KFAC's block of that layer is its exact
            block. The default keeps the paper's and its released code's Fisher (Linear and
            Conv2d only; the optimizers step BatchNorm by SGD), and the layout, ``p`` and the
            files of earlier captures unchanged.

    Returns:
        A :class:`Capture` on the CPU in ``dtype``.

    Raises:
        ValueError: bad arguments or target shapes; :class:`NonFiniteError` for NaN/Inf;
        :class:`fisherlab.layout.UnsupportedLayerError` for unsupported layer configurations and
        for models the per-example Fisher would silently get wrong: parameters used outside their
        module's call (tied weights), batch statistics (BatchNorm with
        ``track_running_stats=False``), outputs that depend on the rest of the batch or change
        between two forward passes (checked by a forward of the first examples alone, skipped for a
        plain ``nn.Sequential`` of per-example modules, which cannot do either:
        :func:`_per_example_by_construction`); :class:`MemoryBudgetError` when the estimate
        exceeds ``memory``.

    **BatchNorm statistics, a stated choice.** By default (eval mode) BatchNorm uses its running
    statistics: every example's output depends on that example alone and the rows are true
    per-example gradients. ``batch_statistics=True`` captures the training forward: BatchNorm
    modules in train mode normalise by the batch's statistics (without updating their running
    averages; modules without running statistics always do), the examples are then coupled, the
    per-example vectors are the backpropagated ones (as in every KFAC implementation) and ∇h is
    the training gradient. The optimizers use it while the model trains; an analysis of the
    Fisher should not (README: BatchNorm). Each capture says which in one line (a
    ``UserWarning``): the batch-statistics one also records ``meta["batch_statistics"] = True``
    (stored with the checkpoint), and a model whose BatchNorm is in train mode, captured in eval
    mode, is told so.
    """
    mode = _fisher(fisher)
    loss_enum = L.Loss.parse(loss)
    if mode is FisherMode.MC and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not isinstance(inputs, Tensor) or inputs.dim() < 1 or inputs.shape[0] < 1:
        raise ValueError(f"inputs must be a torch.Tensor [B, ...] with B >= 1, got {type(inputs).__name__}")
    if not isinstance(targets, Tensor):
        raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__} (use torch.as_tensor)")
    if targets.shape[:1] != inputs.shape[:1]:
        raise ValueError(f"inputs have B={inputs.shape[0]} examples but targets have shape {tuple(targets.shape)}")
    targets = L.normalize_targets(loss_enum, targets)
    device = _device(device)
    dtype = dtype or torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    budget = _budget(memory, device)

    layout = Layout.from_model(model, batchnorm=check_batchnorm(batchnorm))
    if isinstance(storage, dict):
        unknown = sorted(set(storage) - set(layout.names))
        if unknown:
            raise ConfigError(
                f"storage: no captured layer named {', '.join(map(repr, unknown))} (layers: {', '.join(layout.names)})"
            )
        for v in storage.values():
            _storage_value(v)
    else:
        _storage_value(storage)
    if not batch_statistics:
        _refuse_batch_statistics(model)
    ref = next(model.parameters())
    work = model if (ref.device == device and ref.dtype == dtype) else copy.deepcopy(model).to(device, dtype)
    modules = layer_modules(work, layout)

    x = inputs.to(device, dtype if inputs.is_floating_point() else None)
    y = targets.to(device, dtype if targets.is_floating_point() else None)
    B = x.shape[0]

    is_bn = [spec.kind is LayerKind.BATCHNORM for spec in layout.layers]
    recorded: list[dict] = [dict() for _ in modules]
    # In-place operations after a captured layer (ReLU(inplace=True) on its output, `out += identity`
    # of a residual block, an in-place op on its input) would change the tensors the hooks read:
    # a forward of the first examples detects them by tensor versions (below), and the batch's
    # forward copies exactly those layers' inputs (a clone of ā) and outputs (the hook returns a
    # clone, so the in-place op modifies the copy and the recorded output stays the layer's own).
    copy_in: set[int] = set()
    copy_out: set[int] = set()

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if "out" in recorded[i]:
                raise ValueError(
                    f"layer '{layout.layers[i].name}' is called more than once in forward "
                    "(weight sharing is not supported)"
                )
            inp = args[0]
            if is_bn[i]:  # x̂ with the statistics of this very forward (a new tensor: no copy needed)
                kept = batchnorm_normalized(module, inp.detach())
            else:
                kept = inp.detach().clone() if i in copy_in else inp.detach()
            recorded[i].update(inp=kept, out=output, v_in=kept._version, v_out=output._version)
            return output.clone() if i in copy_out else None

        return hook

    def modified() -> tuple[set[int], set[int]]:
        return (
            {i for i, r in enumerate(recorded) if "out" in r and r["inp"]._version != r["v_in"]},
            {i for i, r in enumerate(recorded) if "out" in r and r["out"]._version != r["v_out"]},
        )

    n_probe = min(2, max(1, B - 1))
    meta = dict(meta or {})
    training_bn = _batchnorm_in_train_mode(work)
    with _training_statistics(work, batch_statistics) as coupled, _prepared(work, layout), ExitStack() as stack:
        _say_statistics(training_bn, batch_statistics, coupled, meta)
        needs_probe = not (batch_statistics or _per_example_by_construction(work))  # (before our own hooks)
        for i, m in enumerate(modules):
            stack.callback(m.register_forward_hook(make_hook(i)).remove)
        # The probe forward (the first examples alone, which checks for coupling) also shows, by
        # tensor versions, which layers' tensors in-place operations modify: the full forward then
        # copies those at once instead of being run a second time (a ReLU(inplace=True) right after
        # a Linear or conv, a residual `out += identity` without BatchNorm). A model that needs no
        # probe gets this small forward only where it has a module that works in place; where the
        # probe fails or misses a modification, the full forward is repeated with copies.
        probe = _probe(work, x, n_probe) if needs_probe else None
        if probe is not None or (not needs_probe and B > n_probe and _works_in_place(work)
                                 and _probe(work, x, n_probe) is not None):
            copy_in, copy_out = modified()
        for r in recorded:
            r.clear()
        z = work(x)
        mod_in, mod_out = modified()
        if mod_in or mod_out:  # once more, copying what in-place operations touch
            copy_in, copy_out = copy_in | mod_in, copy_out | mod_out
            z = None
            for r in recorded:
                r.clear()
            z = work(x)
        if not isinstance(z, Tensor):
            raise ValueError(
                f"the model returned a {type(z).__name__}; capture needs one output tensor [B, ...] "
                "(wrap the model so that it returns the logits)"
            )
        if z.shape[:1] != (B,):
            raise ValueError(f"the model's output has shape {tuple(z.shape)}, not [B={B}, ...]")
        for i, r in enumerate(recorded):
            name = layout.layers[i].name
            if "out" not in r:
                raise ValueError(f"layer '{name}' was not used in the forward pass")
            if r["inp"]._version != r["v_in"] or r["out"]._version != r["v_out"]:
                raise ValueError(
                    f"layer '{name}': its input or output was modified in place during forward "
                    "even with copies (a forward pass that is not repeatable?); use out-of-place activations"
                )
        z = z.reshape(B, -1)
        _refuse_coupling(probe, z, n_probe, B)
        L.check_targets(loss_enum, z, y)
        _check_finite(z.detach(), "the network outputs")
        zd = z.detach()
        loss_value = float(L.per_example_loss(loss_enum, zd, y).mean())
        true_vec = L.output_gradient(loss_enum, zd, y)  # [B, d_y]

        seed = None
        sampled = None
        if mode is FisherMode.EMPIRICAL:
            vectors = true_vec.unsqueeze(0)
        elif mode is FisherMode.MC:
            if generator is None:
                seed = int(torch.randint(0, 2**62, (1,)))
                generator = torch.Generator().manual_seed(seed)
            else:
                seed = int(generator.initial_seed())
            sampled = L.sample_targets(loss_enum, zd, n_samples, generator, positions=L.target_positions(loss_enum, y))
            vectors = L.output_gradient(loss_enum, zd.expand(n_samples, *zd.shape), sampled) / math.sqrt(n_samples)
        else:
            vectors = L.hessian_sqrt(loss_enum, zd, positions=L.target_positions(loss_enum, y)).permute(2, 0, 1)  # [K = d_y, B, d_y]
        K = vectors.shape[0]

        outs = [r["out"] for r in recorded]
        # (BatchNorm: T = 1, but its K backward results are [B, C, *S]; S/2 positions of d_out = 2C
        # count them for the estimate)
        positions = [
            r["out"].shape[-2] * r["out"].shape[-1] if spec.kind is LayerKind.CONV2D
            else max(1, r["out"].numel() // (B * spec.d_out))
            for r, spec in zip(recorded, layout.layers)
        ]
        need, worst = _estimate(layout, positions, B, K, storage, torch.tensor([], dtype=dtype).element_size())
        if budget is not None and need > budget:
            raise MemoryBudgetError(
                f"capture would need about {need / 2**30:.3g} GiB ({worst}), more than the "
                f"{budget / 2**30:.3g} GiB {'allowed' if memory is not None else 'available'}; use "
                "storage='factored' (--storage factored), a smaller batch, fewer vectors per example, "
                "or raise the budget (memory=..., --memory)"
            )

        def backward(e: Tensor) -> list[Tensor]:
            return list(torch.autograd.grad(z, outs, grad_outputs=e, retain_graph=True, allow_unused=True))

        g_true = backward(true_vec) if mode is not FisherMode.EMPIRICAL else None
        g_k = [backward(vectors[k]) for k in range(K)]
        reached = [any(gs[i] is not None for gs in g_k + ([g_true] if g_true is not None else [])) for i in range(len(outs))]
        _refuse_reuse(z, layout, modules, reached)
        z = outs = None  # release the graph before the per-layer work

    layers: list[LayerCapture] = []
    grad = torch.empty(layout.p, device=device, dtype=dtype)  # ∇h, written block by block
    for i, spec in enumerate(layout.layers):
        # ∇h block vec([d_out, d_in']) = (1/B) Σ_{b,t} ā gtᵀ as a row-major [d_in', d_out], written in
        # place (no permuted copy, no final concatenation).
        block = grad[spec.offset : spec.stop].view(spec.d_in_bar, spec.d_out)
        choice = storage.get(spec.name, "auto") if isinstance(storage, dict) else storage
        T = 1 if is_bn[i] else positions[i]  # (positions counts a BatchNorm's outputs for the estimate)
        dense = choose_storage(B, K, T, spec.d_in_bar, spec.d_out, choice) is Storage.DENSE
        if dense and spec.kind is LayerKind.CONV2D and spec.d_in > NARROW_PATCHES:
            lc = _dense_conv_layer(spec, recorded[i]["inp"], recorded[i]["out"].shape, [gs[i] for gs in g_k],
                                   g_true[i] if g_true is not None else None, block, B, T)
        else:
            a = layer_inputs(spec, recorded[i]["inp"])  # [B, T, d_in']

            def as_g(t: Tensor | None) -> Tensor:
                if t is None:  # the layer does not influence the output
                    return a.new_zeros(B, T, spec.d_out)
                return layer_output_grads(spec, t, xhat=recorded[i]["inp"] if is_bn[i] else None)

            # [B, K, T, d_out]; K = 1 (empirical, mc K=1) without the copy of a stack
            g = as_g(g_k[0][i]).unsqueeze(1) if K == 1 else torch.stack([as_g(gs[i]) for gs in g_k], dim=1)
            gt = as_g(g_true[i]) if g_true is not None else g[:, 0]
            _check_finite(a, f"the inputs ā of layer '{spec.name}'")
            _check_finite(g, f"the output gradients g of layer '{spec.name}'")
            if g_true is not None:  # (else gt is g's own first column)
                _check_finite(gt, f"the true-label gradient of layer '{spec.name}'")
            torch.addmm(block, a.reshape(-1, spec.d_in_bar).T, gt.reshape(-1, spec.d_out), beta=0, alpha=1 / B, out=block)
            if dense:  # (a Linear or BatchNorm layer asked to be dense)
                A, G = kfac_factors_from(a, g)
                lc = LayerCapture(
                    spec, T, dense=dense_from_factors(a, g).to("cpu", dtype).contiguous(),
                    A=A.to("cpu", dtype), G=G.to("cpu", dtype),
                )
            else:
                lc = LayerCapture(spec, T, a=a.to("cpu", dtype).contiguous(), g=g.to("cpu", dtype).contiguous())
        layers.append(lc)
        recorded[i].clear()

    return Capture(
        layout=layout,
        layers=layers,
        grad=grad.to("cpu"),
        loss_value=loss_value,
        loss=loss_enum.value,
        fisher=mode,
        batch_size=B,
        n_vectors=K,
        targets=targets.detach().cpu(),
        sampled=None if sampled is None else sampled.detach().cpu(),
        seed=seed,
        model=dict(model_description or {}),
        meta=meta,
    )
