"""Dense float64 twins, by per-example autograd (``torch.func``), for tests, notebooks and examples.

Everything here forms p × p matrices or per-example Jacobians of the whole network: tiny
networks only. The operators never import this module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from .capturing import losses as L
from .capturing.record import Capture
from .layout import Layout

__all__ = [
    "per_example_loss_gradients",
    "per_example_output_jacobians",
    "loss_hessians",
    "dense_fisher",
    "dense_fisher_from_capture",
    "dense_kfac_factors",
    "mean_loss_gradient",
    "dense_layer_blocks",
    "van_loan_rearrangement",
    "dense_kronecker_terms",
    "dense_reduce_factors",
]


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def _flat(tree: dict[str, Tensor], model: nn.Module, lead: int) -> Tensor:
    """Per-example parameter trees → ``[*lead, P]`` in ``parameters_to_vector`` order."""
    names = [k for k, _ in model.named_parameters()]
    return torch.cat([tree[k].reshape(*tree[k].shape[:lead], -1) for k in names], dim=-1)


def per_example_loss_gradients(model: nn.Module, x: Tensor, y: Tensor, loss: str) -> Tensor:
    """``∇_θ L(y_b, f(x_b))`` per example, ``[B, P]`` in torch order (model in eval mode)."""
    model.eval()
    params = _params(model)

    def one(p: dict, xb: Tensor, yb: Tensor) -> Tensor:
        z = functional_call(model, p, (xb.unsqueeze(0),)).reshape(1, -1)
        return L.per_example_loss(loss, z, yb.unsqueeze(0)).sum()

    return _flat(vmap(grad(one), in_dims=(None, 0, 0))(params, x, y), model, 1)


def per_example_output_jacobians(model: nn.Module, x: Tensor) -> Tensor:
    """``J_f(x_b) = ∂z_b/∂θ``, ``[B, d_y, P]`` in torch order."""
    model.eval()
    params = _params(model)

    def one(p: dict, xb: Tensor) -> Tensor:
        return functional_call(model, p, (xb.unsqueeze(0),)).reshape(-1)

    return _flat(vmap(jacrev(one), in_dims=(None, 0))(params, x), model, 2)


def loss_hessians(model: nn.Module, x: Tensor, y: Tensor, loss: str) -> Tensor:
    """``Λ_b = ∂²_z L(y_b, z_b)`` by autograd, ``[B, d_y, d_y]``."""
    model.eval()
    with torch.no_grad():
        z = model(x).reshape(x.shape[0], -1)

    def one(zb: Tensor, yb: Tensor) -> Tensor:
        return L.per_example_loss(loss, zb.unsqueeze(0), yb.unsqueeze(0)).sum()

    return vmap(torch.func.hessian(one))(z, y)


def mean_loss_gradient(model: nn.Module, x: Tensor, y: Tensor, loss: str) -> Tensor:
    """``∇h = ∇_θ (1/B) Σ_b L(y_b, f(x_b))`` by plain autograd, ``[P]`` in torch order."""
    model.eval()
    model.zero_grad()
    z = model(x).reshape(x.shape[0], -1)
    L.per_example_loss(loss, z, y).mean().backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad()
    return g.detach()


def dense_fisher(model: nn.Module, x: Tensor, y: Tensor, loss: str, fisher: str) -> Tensor:
    """Dense F ``[P, P]`` (torch order) for ``fisher`` ∈ {``exact``, ``empirical``}.

    exact: ``(1/B) Σ_b J_fᵀ Λ_b J_f``; empirical: ``(1/B) Σ_b ∇ℓ_b ∇ℓ_bᵀ``. (``mc`` is a random
    estimate of ``exact``.)
    """
    B = x.shape[0]
    if fisher == "empirical":
        G = per_example_loss_gradients(model, x, y, loss)
        return G.T @ G / B
    if fisher == "exact":
        J = per_example_output_jacobians(model, x)
        Lam = loss_hessians(model, x, y, loss)
        return torch.einsum("bip,bij,bjq->pq", J, Lam, J) / B
    raise ValueError(f"dense_fisher: fisher must be 'exact' or 'empirical', got '{fisher}'")


def dense_fisher_from_capture(cap: Capture) -> Tensor:
    """``F = (1/B) Jᵀ J`` ``[p, p]`` (fisherlab order) from a capture, in float64."""
    J = cap.per_example_gradients().double()
    return J.T @ J / cap.B


def dense_kfac_factors(cap: Capture) -> list[tuple[Tensor, Tensor]]:
    """Reference KFAC factors (2.25)–(2.27) by explicit loops over examples and positions.

    ``A_i = (1/B) Σ_b Σ_t ā ā ᵀ``, ``G_i = (1/(B·T)) Σ_{b,k,t} g gᵀ`` (T = 1 for Linear). Needs
    factored storage.
    """
    out = []
    for lc in cap.layers:
        if lc.a is None or lc.g is None:
            raise ValueError(f"layer '{lc.spec.name}' is stored dense; KFAC factors need ā and g")
        a, g = lc.a.double(), lc.g.double()
        B, K, T, _ = g.shape
        A = sum(a[b, t, :, None] * a[b, t, None, :] for b in range(B) for t in range(T)) / B
        G = sum(g[b, k, t, :, None] * g[b, k, t, None, :] for b in range(B) for k in range(K) for t in range(T)) / (B * T)
        out.append((A, G))
    return out


def layout_of(model: nn.Module) -> Layout:
    return Layout.from_model(model, warn=False)


# ---- references for the block approximations (EKFAC, KFOC/KPSVD, unit-wise, KFAC-reduce) ------


def dense_layer_blocks(cap: Capture) -> list[Tensor]:
    """The exact diagonal blocks ``F_ii [p_i, p_i]`` of ``F = (1/B) JᵀJ``, in float64."""
    F = dense_fisher_from_capture(cap)
    return [F[s.offset : s.stop, s.offset : s.stop] for s in cap.layout.layers]


def van_loan_rearrangement(F_ii: Tensor, d_in: int, d_out: int) -> Tensor:
    """``R(F_ii) [d_in'², d_out²]`` with ``R[(c,c'),(r,r')] = F_ii[(c,r),(c',r')]`` (vec index
    ``c·d_out + r``), so that ``‖F_ii − A ⊗ G‖_F = ‖R − vec(A)vec(G)ᵀ‖_F`` (row-major vec of A, G)."""
    return F_ii.reshape(d_in, d_out, d_in, d_out).permute(0, 2, 1, 3).reshape(d_in * d_in, d_out * d_out)


def dense_kronecker_terms(F_ii: Tensor, d_in: int, d_out: int, r: int) -> Tensor:
    """``Σ_{k≤r} σ_k U_k ⊗ V_k`` ``[p_i, p_i]`` from the full SVD of the dense rearrangement."""
    U, S, Vh = torch.linalg.svd(van_loan_rearrangement(F_ii, d_in, d_out), full_matrices=False)
    out = torch.zeros_like(F_ii)
    for k in range(min(r, S.shape[0])):
        out += S[k] * torch.kron(U[:, k].reshape(d_in, d_in), Vh[k].reshape(d_out, d_out))
    return out


def dense_reduce_factors(cap: Capture) -> list[tuple[Tensor, Tensor]]:
    """KFAC-reduce factors by explicit loops: ``A = (1/B) Σ_b ā̄_bā̄_bᵀ`` (position mean),
    ``G = (1/B) Σ_{b,k} ḡ_{bk}ḡ_{bk}ᵀ`` (position sum). Needs factored storage."""
    out = []
    for lc in cap.layers:
        if lc.a is None or lc.g is None:
            raise ValueError(f"layer '{lc.spec.name}' is stored dense")
        a, g = lc.a.double(), lc.g.double()
        B, K, T, _ = g.shape
        abar = [sum(a[b, t] for t in range(T)) / T for b in range(B)]
        gbar = [[sum(g[b, k, t] for t in range(T)) for k in range(K)] for b in range(B)]
        A = sum(torch.outer(abar[b], abar[b]) for b in range(B)) / B
        G = sum(torch.outer(gbar[b][k], gbar[b][k]) for b in range(B) for k in range(K)) / B
        out.append((A, G))
    return out
