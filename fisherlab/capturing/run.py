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
from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from ..errors import NonFiniteError
from ..layout import Layout, layer_modules
from . import losses as L
from .layers import dense_from_factors, layer_inputs, layer_output_grads
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
    """Eval mode (BatchNorm statistics, no dropout) and gradients enabled on the layers."""
    was_training = model.training
    modules = layer_modules(model, layout)
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters(recurse=False)]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)
        for p, f in flags:
            p.requires_grad_(f)


def _check_finite(t: Tensor, what: str) -> None:
    # One reduction first (NaN/Inf propagate into the sum); count exactly only when the sum is not
    # finite, which also lets a mere overflow of the sum pass. Much cheaper than isfinite().all().
    if bool(torch.isfinite(t.sum())):
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise NonFiniteError(f"capture: {bad} non-finite value(s) (NaN/Inf) in {what}")


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
) -> Capture:
    """Record per-example layer Jacobians of one mini-batch (MATH.md §2).

    Args:
        model: a network whose ``nn.Linear``/``nn.Conv2d`` layers enter the Fisher; other modules
            with parameters are listed in a warning and left out. It is put in eval mode for the
            capture and restored after; it is copied only when ``device``/``dtype`` differ.
        inputs: ``[B, ...]`` network inputs.
        targets: true targets: class indices ``[B]`` (``cross_entropy``) or ``[B, d_y]``.
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

    Returns:
        A :class:`Capture` on the CPU in ``dtype``.

    Raises:
        ValueError: bad arguments or target shapes; :class:`NonFiniteError` for NaN/Inf;
        :class:`fisherlab.layout.UnsupportedLayerError` for unsupported layer configurations.
    """
    mode = _fisher(fisher)
    loss_enum = L._loss(loss)
    if mode is FisherMode.MC and (not isinstance(n_samples, int) or n_samples < 1):
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not isinstance(inputs, Tensor) or inputs.dim() < 1 or inputs.shape[0] < 1:
        raise ValueError("inputs must be a tensor [B, ...] with B >= 1")
    if targets.shape[:1] != inputs.shape[:1]:
        raise ValueError(f"inputs have B={inputs.shape[0]} examples but targets have shape {tuple(targets.shape)}")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")

    layout = Layout.from_model(model)
    ref = next(model.parameters())
    work = model if (ref.device == device and ref.dtype == dtype) else copy.deepcopy(model).to(device, dtype)
    modules = layer_modules(work, layout)

    x = inputs.to(device, dtype if inputs.is_floating_point() else None)
    y = targets.to(device, dtype if targets.is_floating_point() else None)
    B = x.shape[0]

    recorded: list[dict] = [dict() for _ in modules]

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if "out" in recorded[i]:
                raise ValueError(
                    f"layer '{layout.layers[i].name}' is called more than once in forward "
                    "(weight sharing is not supported)"
                )
            inp = args[0]
            recorded[i].update(inp=inp.detach(), out=output, v_in=inp._version, v_out=output._version)

        return hook

    with _prepared(work, layout), ExitStack() as stack:
        for i, m in enumerate(modules):
            stack.callback(m.register_forward_hook(make_hook(i)).remove)
        z = work(x)
        for i, r in enumerate(recorded):
            name = layout.layers[i].name
            if "out" not in r:
                raise ValueError(f"layer '{name}' was not used in the forward pass")
            if r["inp"]._version != r["v_in"] or r["out"]._version != r["v_out"]:
                raise ValueError(
                    f"layer '{name}': its input or output was modified in place during forward "
                    "(e.g. ReLU(inplace=True)); use out-of-place activations"
                )
        z = z.reshape(B, -1)
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
            sampled = L.sample_targets(loss_enum, zd, n_samples, generator)
            vectors = L.output_gradient(loss_enum, zd.expand(n_samples, *zd.shape), sampled) / math.sqrt(n_samples)
        else:
            vectors = L.hessian_sqrt(loss_enum, zd).permute(2, 0, 1)  # [K = d_y, B, d_y]
        K = vectors.shape[0]

        outs = [r["out"] for r in recorded]

        def backward(e: Tensor) -> list[Tensor]:
            return list(torch.autograd.grad(z, outs, grad_outputs=e, retain_graph=True, allow_unused=True))

        g_true = backward(true_vec) if mode is not FisherMode.EMPIRICAL else None
        g_k = [backward(vectors[k]) for k in range(K)]
        z = outs = None  # release the graph before the per-layer work

    layers: list[LayerCapture] = []
    grad = torch.empty(layout.p, device=device, dtype=dtype)  # ∇h, written block by block
    for i, spec in enumerate(layout.layers):
        a = layer_inputs(spec, recorded[i]["inp"])  # [B, T, d_in']
        T = a.shape[1]

        def as_g(t: Tensor | None) -> Tensor:
            if t is None:  # the layer does not influence the output
                return a.new_zeros(B, T, spec.d_out)
            return layer_output_grads(spec, t)

        g = torch.stack([as_g(gs[i]) for gs in g_k], dim=1)  # [B, K, T, d_out]
        gt = as_g(g_true[i]) if g_true is not None else g[:, 0]
        _check_finite(a, f"the inputs ā of layer '{spec.name}'")
        _check_finite(g, f"the output gradients g of layer '{spec.name}'")
        _check_finite(gt, f"the true-label gradient of layer '{spec.name}'")
        # ∇h block vec([d_out, d_in']) = (1/B) Σ_{b,t} ā gtᵀ as a row-major [d_in', d_out], written in
        # place by one GEMM (no permuted copy, no final concatenation).
        block = grad[spec.offset : spec.stop].view(spec.d_in_bar, spec.d_out)
        torch.addmm(block, a.reshape(-1, spec.d_in_bar).T, gt.reshape(-1, spec.d_out), beta=0, alpha=1 / B, out=block)
        choice = storage.get(spec.name, "auto") if isinstance(storage, dict) else storage
        if choose_storage(B, K, T, spec.d_in_bar, spec.d_out, choice) is Storage.DENSE:
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
        meta=dict(meta or {}),
    )
