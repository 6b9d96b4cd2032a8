"""Natural-gradient optimizers built on fisherlab's operators (§2.3–§3, Algorithm 1).

Every optimizer is a :class:`torch.optim.Optimizer` whose step, on a mini-batch (x_b, y_b),

1. captures the batch with :func:`fisherlab.capture` on the model's device (one forward and
   K + 1 backward passes to the layer outputs: ā, g, ∇h and the KFAC factors; MATH.md §2);
2. builds the method's operator from :mod:`fisherlab.operators` (no algebra is duplicated here);
3. computes the negative increment ζ = op⁻¹ w with w = ∇h + ω θ (3.1)–(3.4), ω the weight decay;
4. maps ζ from fisherlab order to the parameters through the :class:`~fisherlab.layout.Layout`
   and updates θ ← θ − α ζ (2.31a) (with heavy-ball momentum μ when asked:
   b ← μ b + ζ, θ ← θ − α b).

| class | ζ | operator |
|---|---|---|
| :class:`KFACOptimizer` | F•KFAC⁻¹w (3.3), π- or Tikhonov-damped | :class:`~fisherlab.operators.KFAC` |
| :class:`TwoLevelKFACOptimizer` | ζ_KFAC + R_0ᵀβ*, β* = F_coarse⁻¹R_0r (3.9)–(3.11) | :class:`~fisherlab.operators.TwoLevelKFAC` |
| :class:`TKOOptimizer` | ζ_KFAC + R_0ᵀF_coarse⁻¹R_0w (4.7) | :class:`~fisherlab.operators.TKO` |
| :class:`NaturalGradient` | F•⁻¹w (3.2) by Woodbury, or blockdiag (3.7) | :class:`~fisherlab.operators.ExactFisher` / :class:`~fisherlab.operators.BlockDiagonalFisher` |

Design choices (documented here once, referred to by the classes):

* **Weight decay** ω is added to the gradient *before* preconditioning, w = ∇h + ωθ (the paper's
  setup, §4: weight decay 10⁻³ for all optimizers), so ζ = op⁻¹(∇h + ωθ). The coarse spaces
  that depend on the right-hand side (residuals, Krylov-residuals, Taylor) and the gap (4.6) are
  built for this w.
* **Running averages** (``factor_decay`` ρ ∈ [0, 1)): A_i ← ρA_i + (1 − ρ)A_i^batch, and the same
  for G_i; the first step starts from the batch factors; ρ = 0 uses the batch factors only.
* **Inverse update period** T_inv: the one-level KFAC operator (the factor eigendecompositions
  (3.26)–(3.27)) is rebuilt from the current (averaged) factors on steps 1, 1 + T_inv, 1 + 2T_inv, …
  and reused in between, unchanged, as the one-level preconditioner F•KFAC⁻¹ of the new batch.
  The coarse correction (R_0, F_coarse = R_0F•R_0ᵀ, the residual) is rebuilt every step from the
  current batch, so the multiplicative correction stays optimal (3.10) for the KFAC operator in
  use and its gap (4.6) stays ≤ 0.
* **Parameters outside the Fisher** (BatchNorm affine parameters, …) get a plain SGD step with
  the same lr, weight decay and momentum on their gradient of the mean loss, computed by one
  ordinary forward/backward in the model's current mode (which also updates BatchNorm running
  statistics, once per step).
* **BatchNorm during the capture**: :func:`fisherlab.capture` runs the model in eval mode. While
  the model is training, the optimizer hides the running statistics of its BatchNorm layers for
  the duration of the capture, so that they normalise with the batch statistics exactly as the
  training forward does; the captured ∇h is then the training gradient. (Examples are coupled
  through the batch statistics; as in every KFAC implementation, the per-example vectors are the
  backpropagated ones.) Dropout is off during the capture.
* **Where the algebra runs**: the capture runs on the model's device and dtype; the operators
  run in float64 on the CPU (where :mod:`fisherlab.operators` lives); ζ is moved back to the
  parameters' device and dtype.
* **Monte-Carlo draws** (``fisher="mc"``, K = ``n_samples``) come from one CPU generator per
  optimizer (``generator``, or ``torch.Generator().manual_seed(seed)``), advanced step by step.

* **Protocol** (``protocol="paper"`` default, or ``"released-code"``;
  :class:`~fisherlab.operators.Protocol`, docs/PROTOCOL.md): the options in which the paper's
  released code departs from its equations — damping variants (``damping_mode``,
  ``fine_damping_mode``), ``factor_decay="auto"``, ``factor_update_period``,
  ``fisher_subbatch``, and for the two-level optimizers ``coarse_rhs``, ``coarse_diagonal``,
  ``coarse_normalization``, ``coefficient``, ``coarse_decay``, ``coarse_update_period``. The
  paper's values are the defaults above; an explicit option overrides the preset.

Each step appends ``{"step", "loss", "gap", "logged_gap", "ratio", "seconds", …}`` to :attr:`history`:
``loss`` is h of the batch before the update; ``gap`` (``record_gap=True``) is the TRUE
𝔈(β) − 𝔈(0) of (4.6) against F• and ζ of the batch for the two-level methods (0 for KFAC);
``logged_gap`` the same with the coarse matrix β was solved with (the released code's log;
equal to ``gap`` under the paper's protocol); ``ratio`` (``record_ratio=True``)
is the reduction ratio 𝔈(β)/𝔈(0), 𝔈 of (4.1), which needs the exact ζ = F•⁻¹w (one more
Woodbury solve). The paper's Fig. 5 is the ``gap`` column over training.

The batch is given to the step, ``opt.step(inputs=x, targets=y)``, or beforehand with
``opt.set_batch(x, y)`` (consumed by the next step).
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .capturing import losses as L
from .capturing.record import Capture, FisherMode
from .capturing.run import capture as _capture
from .jacobian import Jacobian
from .layout import Layout, layer_modules
from . import methods as registry
from .damping import Damping, resolve_damping
from .errors import ConfigError
from .methods import Family
from .operators import (
    KFAC,
    TKO,
    BlockDiagonalFisher,
    CoarseCorrection,
    ExactFisher,
    FisherOperator,
    TwoLevelKFAC,
    check_damping,
)
from .operators.coarse import COARSE_SPACES
from .operators.kfac import DampingMode, layer_positions
from .operators.protocol import (
    UNSET,
    Protocol,
    auto_decay,
    check_coarse_diagonal,
    check_coarse_normalization,
    check_coarse_rhs,
    check_coefficient,
)
from .operators.twolevel import coarse_matrix

__all__ = [
    "FisherOptimizer",
    "KFACOptimizer",
    "TwoLevelKFACOptimizer",
    "TKOOptimizer",
    "NaturalGradient",
    "MethodOptimizer",
    "OPTIMIZERS",
    "LEGENDS",
    "make_optimizer",
    "training_factory",
    "register_training_optimizers",
]


# ---------------------------------------------------------------------------------------------
# validation helpers (one-line errors)
# ---------------------------------------------------------------------------------------------


def _number(name: str, value: Any, *, low: float, strict: bool, high: float = math.inf) -> float:
    """``value`` as a finite float in (low, high) (``strict``) or [low, high); a one-line error."""
    rng = f"{'(' if strict else '['}{low:g}, {high:g})" if math.isfinite(high) else f"{'>' if strict else '>='} {low:g}"
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number {'in ' if rng[0] in '([' else ''}{rng}, got {value!r}") from None
    if not math.isfinite(v) or v < low or (strict and v == low) or v >= high:
        raise ConfigError(f"{name} must be finite and {'in ' if rng[0] in '([' else ''}{rng}, got {value!r}")
    return v


def _positive(name: str, value: Any) -> float:
    return _number(name, value, low=0.0, strict=True)


def _in_unit(name: str, value: Any) -> float:
    return _number(name, value, low=0.0, strict=False, high=1.0)


def _nonneg(name: str, value: Any) -> float:
    return _number(name, value, low=0.0, strict=False)


def _posint(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


@contextmanager
def _batch_statistics(model: nn.Module) -> Iterator[None]:
    """While the model trains, let its BatchNorm layers use batch statistics in eval mode.

    ``F.batch_norm`` normalises with the batch statistics when a module has no running
    statistics; hiding them (and restoring them afterwards) makes the eval-mode capture compute
    the training forward without updating the running averages.
    """
    hidden: list[tuple[nn.Module, Tensor, Tensor]] = []
    if model.training:
        for m in model.modules():
            if isinstance(m, _BN_TYPES) and m.training and m.running_mean is not None:
                hidden.append((m, m.running_mean, m.running_var))
                m.running_mean = None
                m.running_var = None
    try:
        yield
    finally:
        for m, mean, var in hidden:
            m.running_mean = mean
            m.running_var = var


# ---------------------------------------------------------------------------------------------
# the base optimizer
# ---------------------------------------------------------------------------------------------


class FisherOptimizer(torch.optim.Optimizer):
    """Base class: capture → operator → ζ = op⁻¹(∇h + ωθ) → θ ← θ − αζ (module docstring).

    Subclasses implement :meth:`_operator` (the operator for this step's Jacobian and
    right-hand side). All arguments are keyword-only except the model.

    Args:
        model: the network; its ``nn.Linear``/``nn.Conv2d`` layers are preconditioned, every
            other parameter gets SGD (module docstring). All its parameters form one group.
        lr: learning rate α > 0 (2.31a).
        damping: λ > 0 of F• = F + λI (2.17), or a :class:`fisherlab.Damping` in the Fisher's
            scale, resolved on every step's batch (e.g. ``Damping(1e-3, "max")``: λ = 1e-3·λ_max(F)
            of that batch); validated, one-line :class:`DampingError`.
        loss: ``"cross_entropy"``, ``"mse"`` (½‖y − z‖²) or ``"bce_logits"`` — the training
            objective h = (1/B)Σ_b L(y_b, f(x_b)) (2.10) and its likelihood for the Fisher.
        fisher: ``"mc"`` (the paper's, K = ``n_samples`` draws), ``"exact"`` or ``"empirical"``.
        n_samples: K for ``"mc"``.
        weight_decay: ω ≥ 0, added to the gradient before preconditioning: w = ∇h + ωθ.
        momentum: μ ∈ [0, 1) (heavy ball on ζ: b ← μb + ζ, θ ← θ − αb); 0 by default.
        generator: CPU generator for the MC draws (advanced by every step).
        seed: seed of a fresh generator when ``generator`` is ``None`` (random when both are).
        record_gap: record the gap (4.6) of each step in :attr:`history`.
        record_ratio: record the reduction ratio 𝔈(β)/𝔈(0) (4.1) (one extra exact solve).
        weight_decay_mode: ``"preconditioned"`` (default: ζ = op⁻¹(∇h + ωθ)) or ``"after"``
            (ζ = op⁻¹∇h, then ωθ added to the Fisher's parameters' direction — what
            ``torch.optim.SGD(weight_decay=ω)`` does in the released scripts).
        kl_clip: c > 0 rescales ζ by min(1, √(c / Σ_p|⟨ζ_p, ∇h_p⟩|)) over the Fisher's parameter
            tensors (the released code's ``constraint_norm=True, clipping=c``); ``None``: off.
            The gap and ratio are those of the unscaled ζ; the scale is recorded as ``kl_scale``.
        protocol: ``"paper"`` / ``"released-code"`` (:class:`~fisherlab.operators.Protocol`): the
            defaults of ``weight_decay_mode``, ``kl_clip`` (and, in subclasses, of their options).
        loss_scale: c > 0: the Fisher's parameters are stepped on the loss c·L (each step's capture
            passes through :meth:`Capture.scaled`: F → c²F, ∇h → c∇h), so λ, lr and ω are stated
            in its units; ``1/d_y`` is the loss averaged over its d_y outputs (the paper's code).
            The parameters outside the Fisher keep fisherlab's loss.

    Attributes:
        history: one dict per step: ``step``, ``loss``, ``gap``, ``logged_gap``, ``ratio``,
            ``seconds``, ``method``, ``coarse_dim`` (``kl_scale`` with ``kl_clip``).
        last_metrics: the recorded ``gap``/``ratio``/``coarse_dim`` and ``step_seconds`` of the
            last step (the training loop adds them to its metrics CSV).
        layout: the :class:`Layout` of the model.
        last_operator: the operator of the last step (for inspection).
    """

    method: str = "fisher"
    wants_closure: bool = True
    """For :func:`fisherlab.train.train`: step with the closure, whose gradients serve the
    parameters outside the Fisher (see :meth:`step`)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        damping: float,
        loss: str,
        fisher: str = "mc",
        n_samples: int = 1,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        record_gap: bool = False,
        record_ratio: bool = False,
        weight_decay_mode: str | None = None,
        kl_clip: float | None = UNSET,
        protocol: str | Protocol | None = None,
        loss_scale: float = 1.0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} takes the model (nn.Module), not {type(model).__name__}: "
                "each step captures the model on the batch"
            )
        lr = _positive("lr", lr)
        lam = damping if isinstance(damping, Damping) else check_damping(damping)  # a Damping resolves per batch
        self.loss = L.Loss.parse(loss).value
        try:
            self.fisher = FisherMode(fisher).value
        except ValueError:
            raise ConfigError(
                f"unknown fisher mode {fisher!r} (choose one of {', '.join(m.value for m in FisherMode)})"
            ) from None
        self.n_samples = _posint("n_samples", n_samples)
        self.loss_scale = _positive("loss_scale", loss_scale)
        wd = _nonneg("weight_decay", weight_decay)
        mom = _in_unit("momentum", momentum)
        if generator is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)))
            generator = torch.Generator().manual_seed(int(seed))
        self.generator = generator
        self.record_gap = bool(record_gap)
        self.record_ratio = bool(record_ratio)
        try:
            proto = Protocol.parse(protocol).with_options(weight_decay_mode=weight_decay_mode, kl_clip=kl_clip)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if proto.weight_decay_mode not in ("preconditioned", "after"):
            raise ConfigError(f"weight_decay_mode must be 'preconditioned' or 'after', got {proto.weight_decay_mode!r}")
        self.weight_decay_mode = proto.weight_decay_mode
        self.kl_clip = None if proto.kl_clip is None else _positive("kl_clip", proto.kl_clip)
        self.protocol = proto

        self.model = model
        self.layout = Layout.from_model(model, warn=False)
        if self.layout.excluded:
            warnings.warn(
                f"fisherlab {type(self).__name__}: these modules are not part of the Fisher and get plain SGD "
                f"steps (same lr, weight decay, momentum): {', '.join(self.layout.excluded)}",
                UserWarning,
                stacklevel=3,
            )
        params = list(model.parameters())
        super().__init__(params, dict(lr=lr, damping=lam, weight_decay=wd, momentum=mom))
        self._params = params
        self._offsets: list[int] = []
        pos = 0
        for p in params:
            self._offsets.append(pos)
            pos += p.numel()
        inside = {id(p) for m in layer_modules(model, self.layout) for p in m.parameters(recurse=False)}
        self._outside = [p for p in params if id(p) not in inside]
        self._has_bn = any(isinstance(m, _BN_TYPES) for m in model.modules())
        self._batch: tuple[Tensor, Tensor] | None = None
        self._steps = 0
        self.history: list[dict] = []
        self.last_metrics: dict = {}
        self.last_operator: FisherOperator | None = None

    # ---- the batch -------------------------------------------------------------------------
    def set_batch(self, inputs: Tensor, targets: Tensor) -> None:
        """Give the batch ``inputs [B, ...]``, ``targets [B]``/``[B, d_y]`` to the next step."""
        self._batch = (inputs, targets)

    @property
    def steps(self) -> int:
        """Number of steps taken."""
        return self._steps

    # ---- the Fisher sub-batch --------------------------------------------------------------
    def _subbatch_size(self, B: int) -> int:
        s = self.fisher_subbatch
        return int(s) if isinstance(s, int) else max(1, int(s * B))  # type: ignore[operator]

    def _fisher_jacobian(self, jac: Jacobian) -> Jacobian:
        """The Jacobian this step's curvature comes from: the batch's, or that of ``fisher_subbatch``
        examples drawn uniformly with replacement by the generator and captured again (their own
        Monte-Carlo draws), drawn once per step, on demand."""
        if self.fisher_subbatch is None:
            return jac
        if self._sub_jac is None:
            x, y = self._step_batch
            idx = torch.randint(0, x.shape[0], (self._subbatch_size(x.shape[0]),), generator=self.generator)
            self.last_subbatch = idx
            sub = idx.to(x.device)
            self._sub_jac = Jacobian.from_capture(self._capture(x[sub], y[sub]), torch.float64)
        return self._sub_jac

    fisher_subbatch: int | float | None = None
    last_subbatch: Tensor | None = None

    # ---- hooks ---------------------------------------------------------------------------------
    def _operator(self, jac: Jacobian, rhs: Tensor, damping: float) -> FisherOperator:  # pragma: no cover
        raise NotImplementedError

    def _record(self, op: FisherOperator, rhs: Tensor, zeta: Tensor, rec: dict) -> None:
        """Fill ``gap``/``ratio``/``coarse_dim`` of the step record (subclasses refine)."""

    # ---- the step ------------------------------------------------------------------------------
    def _capture(self, x: Tensor, y: Tensor) -> Capture:
        ref = self._params[0]
        training_bn = self.model.training and self._has_bn
        with _batch_statistics(self.model), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="fisherlab: these modules have parameters")
            # the optimizer's own training forward (module docstring): stated there, not per step
            warnings.filterwarnings("ignore", message="fisherlab: capture with batch statistics")
            return _capture(
                self.model, x, y, loss=self.loss, fisher=self.fisher, n_samples=self.n_samples,
                generator=self.generator, device=ref.device, dtype=ref.dtype, storage=self.storage,
                batch_statistics=training_bn,  # the training forward (module docstring)
            ).scaled(self.loss_scale)

    storage: str = "auto"
    """The capture storage of each step (a method that needs per-position factors sets ``"factored"``)."""

    def _outside_gradients(self, x: Tensor, y: Tensor) -> list[Tensor | None]:
        """Gradients of the mean loss for parameters outside the Fisher (one ordinary
        forward/backward in the model's mode; it also updates BatchNorm running statistics)."""
        trainable = [p for p in self._outside if p.requires_grad]
        if not trainable:
            if self._has_bn and self.model.training:
                with torch.no_grad():
                    self.model(x)  # running statistics only
            return [None] * len(self._outside)
        with torch.enable_grad():
            z = self.model(x).reshape(x.shape[0], -1)
            h = L.per_example_loss(self.loss, z, y).mean()
            grads = torch.autograd.grad(h, trainable, allow_unused=True)
        by_id = {id(p): g for p, g in zip(trainable, grads)}
        return [by_id.get(id(p)) for p in self._outside]

    def step(self, closure: Callable[[], Any] | None = None, *, inputs: Tensor | None = None, targets: Tensor | None = None) -> Any:
        """One update θ ← θ − α·op⁻¹(∇h + ωθ) on the batch (module docstring).

        Args:
            closure: optional, as in torch: zeroes the gradients, evaluates the mean loss of
                **the same batch** in the model's mode, backpropagates and returns the loss. It
                is called first (gradients enabled); its ``.grad`` then serves the parameters
                outside the Fisher and its forward has updated the BatchNorm statistics, so the
                optimizer runs no pass of its own besides the capture. Without a closure the
                optimizer runs that forward/backward itself (when the model has such
                parameters or BatchNorm layers).
            inputs: ``[B, ...]`` batch inputs (or given earlier by :meth:`set_batch`).
            targets: true targets ``[B]`` (class indices) or ``[B, d_y]``.

        Returns:
            The closure's value when given, else the batch loss h before the update (float).
        """
        if (inputs is None) != (targets is None):
            raise ConfigError(f"{type(self).__name__}.step: give both inputs and targets")
        if inputs is None:
            if self._batch is None:
                raise ConfigError(
                    f"{type(self).__name__}.step needs the batch: step(inputs=x, targets=y) or set_batch(x, y) first"
                )
            inputs, targets = self._batch
        self._batch = None
        assert targets is not None
        closure_value = None
        if closure is not None:
            with torch.enable_grad():
                closure_value = closure()

        t0 = time.perf_counter()
        group = self.param_groups[0]
        lr = _positive("lr", group["lr"])
        lam_spec = group["damping"]
        wd = _nonneg("weight_decay", group["weight_decay"])
        mom = _in_unit("momentum", group["momentum"])
        ref = self._params[0]
        x = inputs.to(ref.device, ref.dtype if inputs.is_floating_point() else None)
        y = targets.to(ref.device, ref.dtype if targets.is_floating_point() else None)

        cap = self._capture(x, y)
        if closure is not None:
            outside_grads = [p.grad for p in self._outside]
        else:
            outside_grads = self._outside_gradients(x, y)
        self._steps += 1

        jac = Jacobian.from_capture(cap, torch.float64)
        lam = resolve_damping(lam_spec, jac)  # absolute λ, or α·λ_max(F) / … of this batch
        grad = cap.grad.to(torch.float64)
        rhs = grad
        if wd > 0 and self.weight_decay_mode == "preconditioned":
            rhs = rhs + wd * self.layout.parameters_vector(self.model).to("cpu", torch.float64)
        self._step_batch = (x, y)  # for a Fisher sub-batch (the KFAC-based optimizers)
        self._sub_jac = None
        op = self._operator(jac, rhs, lam)
        zeta = op.solve(rhs)
        self.last_operator = op

        rec: dict = {
            "step": self._steps,
            "loss": float(cap.loss_value),
            "gap": None,
            "logged_gap": None,
            "ratio": None,
            "seconds": 0.0,
            "method": self.method,
            "coarse_dim": None,
            "damping": lam,
        }
        self._record(op, rhs, zeta, rec)
        if self.kl_clip is not None:
            zeta, rec["kl_scale"] = self._kl_clipped(zeta, grad)

        direction = self.layout.to_torch_order(zeta)
        outside = {id(p): g for p, g in zip(self._outside, outside_grads)}
        with torch.no_grad():
            for p, off in zip(self._params, self._offsets):
                if not p.requires_grad:
                    continue
                if id(p) in outside:
                    g = outside[id(p)]
                    if g is None:
                        continue
                    d = g.detach().to(p.dtype)
                    if wd > 0:
                        d = d + wd * p
                else:
                    d = direction[off : off + p.numel()].view_as(p).to(p.device, p.dtype)
                    if wd > 0 and self.weight_decay_mode == "after":
                        d = d + wd * p
                if mom > 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(mom).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)
        rec["seconds"] = time.perf_counter() - t0
        self.history.append(rec)
        self.last_metrics = {k: rec[k] for k in ("gap", "logged_gap", "ratio", "coarse_dim") if rec[k] is not None}
        self.last_metrics["step_seconds"] = rec["seconds"]
        return closure_value if closure is not None else float(cap.loss_value)

    def _kl_clipped(self, zeta: Tensor, grad: Tensor) -> tuple[Tensor, float]:
        """ζ·min(1, √(c / Σ_p|⟨ζ_p, ∇h_p⟩|)) over the Fisher's parameter tensors p (weight and
        bias apart), c = ``kl_clip`` (the released code's ``constraint_norm``); the scale too."""
        z, g = self.layout.to_torch_order(zeta), self.layout.to_torch_order(grad)
        inside = {id(p) for p in self._params} - {id(p) for p in self._outside}
        total = 0.0
        for p, off in zip(self._params, self._offsets):
            if id(p) in inside:
                total += abs(float(z[off : off + p.numel()] @ g[off : off + p.numel()]))
        scale = 1.0 if total <= 0 else min(1.0, math.sqrt(self.kl_clip / total))  # type: ignore[operator]
        return zeta * scale, scale

    # ---- state ---------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {"steps": self._steps, "generator": self.generator.get_state()}

    def _load_extra_state(self, d: dict) -> None:
        self._steps = int(d.get("steps", 0))
        if "generator" in d:
            self.generator.set_state(d["generator"])

    def state_dict(self) -> dict:
        """torch's optimizer state plus ``"fisherlab"``: step count, generator state (and the
        running KFAC factors for the KFAC-based optimizers)."""
        sd = super().state_dict()
        sd["fisherlab"] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("fisherlab", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self._load_extra_state(extra)

    def __repr__(self) -> str:
        g = self.param_groups[0]
        return (
            f"{type(self).__name__}(method={self.method!r}, lr={g['lr']:g}, damping={g['damping']}, "
            f"fisher={self.fisher!r}, weight_decay={g['weight_decay']:g}, momentum={g['momentum']:g})"
        )


# ---------------------------------------------------------------------------------------------
# KFAC and the corrections built on it
# ---------------------------------------------------------------------------------------------


def _decay(name: str, value: Any) -> float | str:
    """A running-average weight ρ ∈ [0, 1) or ``"auto"`` (ρ_k = min(1 − 1/k, 0.95)); one-line error."""
    if isinstance(value, str):
        if value != "auto":
            raise ConfigError(f"{name} must be a number in [0, 1) or 'auto', got {value!r}")
        return value
    return _in_unit(name, value)


def _subbatch(value: Any) -> int | float | None:
    """``None``, a size ≥ 1 (int) or a fraction of the batch in (0, 1] (float); one-line error."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"fisher_subbatch must be None, a positive integer or a fraction in (0, 1], got {value!r}")
    if isinstance(value, int):
        return _posint("fisher_subbatch", value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (0.0 < v <= 1.0):
        raise ConfigError(f"fisher_subbatch must be None, a positive integer or a fraction in (0, 1], got {value!r}")
    return v


def _damping_mode(value: Any) -> str:
    try:
        return DampingMode.parse(value).value
    except ValueError as err:
        raise ConfigError(str(err)) from None


class _KFACBased(FisherOptimizer):
    """Keeps the running factors and the one-level KFAC operator (module docstring).

    Args (besides :class:`FisherOptimizer`'s); ``None`` takes the ``protocol``'s value:
        damping_mode: ``"pi"`` (2.30), ``"tikhonov"`` (A ⊗ G + λI), ``"sqrt"``
            ((A + √λI) ⊗ (G + √λI)) or ``"lambda"`` ((A + λI) ⊗ (G + λI)); for the two-level
            optimizers the fine level's (unless ``fine_damping_mode`` is given).
        factor_decay: ρ ∈ [0, 1): A ← ρA + (1 − ρ)A_batch, G likewise; 0 = batch factors;
            ``"auto"``: ρ_k = min(1 − 1/k, 0.95) at the 0-based step k of the update (the released
            code's schedule; the first update takes the batch factors).
        factor_update_period: T_cov ≥ 1: the factors are updated on steps 1, 1 + T_cov, … only
            (the released code: 100); in between they stay as they are.
        inverse_update_period: T_inv ≥ 1: the KFAC eigendecompositions are rebuilt every T_inv
            steps and reused in between.
        conv_damping: ``"literal"`` or ``"released-code"``: ``"sqrt"``/``"lambda"`` on conv layers as
            the released code normalises them (:func:`fisherlab.operators.kfac.released_code_shifts`;
            the capture is then factored; ignored for ``"pi"``/``"tikhonov"``).
        fisher_subbatch: ``None`` (the batch; given explicitly it also switches off a preset's), a size s or a
            fraction f of the batch: the factors
            (and the two-level coarse matrix) of an update come from s (or ⌊fB⌋, at least 1)
            examples drawn uniformly WITH replacement from the batch by the optimizer's generator,
            captured again (their own Monte-Carlo draws); the gradient is the whole batch's.
        protocol: ``"paper"`` (default: the values above are fisherlab's defaults, 0/1/None) or
            ``"released-code"`` (:class:`~fisherlab.operators.Protocol`, docs/PROTOCOL.md); an
            option given explicitly overrides it.

    Attributes:
        factors: the current ``[(A_i, G_i)]`` (float64, CPU), ``None`` before the first step.
        kfac: the one-level operator of the last step.
        protocol: the resolved :class:`~fisherlab.operators.Protocol`.
        last_subbatch: the indices of the last Fisher sub-batch (``None`` without one).
    """

    two_level: bool = False

    def __init__(
        self,
        model: nn.Module,
        *,
        damping_mode: str | None = None,
        factor_decay: float | str | None = None,
        inverse_update_period: int | None = None,
        factor_update_period: int | None = None,
        fisher_subbatch: int | float | None = UNSET,
        protocol: str | Protocol | None = None,
        fine_damping_mode: str | None = None,
        conv_damping: str | None = None,
        **kw: Any,
    ) -> None:
        try:
            proto = Protocol.parse(protocol)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.two_level:
            fine = fine_damping_mode if fine_damping_mode is not None else damping_mode
            proto = proto.with_options(fine_damping_mode=fine)
        elif fine_damping_mode is not None:
            raise ConfigError(f"{type(self).__name__} has one level: give damping_mode, not fine_damping_mode")
        else:
            proto = proto.with_options(damping_mode=damping_mode)
        proto = proto.with_options(
            conv_damping=conv_damping,
            factor_decay=factor_decay, inverse_update_period=inverse_update_period,
            factor_update_period=factor_update_period, fisher_subbatch=fisher_subbatch,
        )
        self.damping_mode = _damping_mode(proto.fine_damping_mode if self.two_level else proto.damping_mode)
        self.factor_decay = _decay("factor_decay", proto.factor_decay)
        self.inverse_update_period = _posint("inverse_update_period", proto.inverse_update_period)
        self.factor_update_period = _posint("factor_update_period", proto.factor_update_period)
        self.fisher_subbatch = _subbatch(proto.fisher_subbatch)
        if proto.conv_damping not in ("literal", "released-code"):
            raise ConfigError(f"conv_damping must be 'literal' or 'released-code', got {proto.conv_damping!r}")
        self.conv_damping = proto.conv_damping
        scaled = self.conv_damping == "released-code" and self.damping_mode in ("sqrt", "lambda")
        if scaled and any(isinstance(mod, nn.Conv2d) for mod in model.modules()):
            self.storage = "factored"  # the conv positions T (dense rows do not record them)
        super().__init__(model, protocol=proto, **kw)
        self.factors: list[tuple[Tensor, Tensor]] | None = None
        self.kfac: KFAC | None = None
        self._kfac_built_at = 0
        self._sub_jac: Jacobian | None = None

    # ---- the running factors -----------------------------------------------------------------
    def _rho(self, decay: float | str) -> float:
        """ρ of an update at this step: the constant, or min(1 − 1/k, 0.95) at the 0-based step k."""
        return auto_decay(self._steps - 1) if decay == "auto" else float(decay)

    def _due(self, period: int) -> bool:
        return (self._steps - 1) % period == 0

    def _update_factors(self, jac: Jacobian) -> list[tuple[Tensor, Tensor]]:
        if self.factors is not None and not self._due(self.factor_update_period):
            return self.factors
        batch = [lj.kfac_factors for lj in self._fisher_jacobian(jac).layers]
        rho = self._rho(self.factor_decay)
        if self.factors is None or rho == 0.0:
            self.factors = [(A.clone(), G.clone()) for A, G in batch]
        else:
            self.factors = [
                (rho * A + (1 - rho) * Ab, rho * G + (1 - rho) * Gb) for (A, G), (Ab, Gb) in zip(self.factors, batch)
            ]
        return self.factors

    def _one_level(self, jac: Jacobian, damping: float) -> KFAC:
        """F•KFAC for this step: rebuilt from the current factors every T_inv steps (and when λ
        changes); otherwise the previous operator's blocks, bound to this step's Jacobian."""
        factors = self._update_factors(jac)
        due = self.kfac is None or self._due(self.inverse_update_period)
        if due or self.kfac.damping != damping:  # type: ignore[union-attr]
            positions = layer_positions(jac, self.conv_damping) if self.conv_damping == "released-code" else None
            self.kfac = KFAC.from_factors(factors, damping, self.damping_mode, positions=positions, conv_damping=self.conv_damping)
            self._kfac_built_at = self._steps
        # otherwise the previous operator as it is: KFAC is independent of the Jacobian
        return self.kfac  # type: ignore[return-value]

    def _extra_state(self) -> dict:
        d = super()._extra_state()
        d["factors"] = None if self.factors is None else [(A.clone(), G.clone()) for A, G in self.factors]
        return d

    def _load_extra_state(self, d: dict) -> None:
        super()._load_extra_state(d)
        f = d.get("factors")
        self.factors = None if f is None else [(A.clone(), G.clone()) for A, G in f]
        self.kfac = None  # rebuilt from the loaded factors on the next step

    def _record(self, op: FisherOperator, rhs: Tensor, zeta: Tensor, rec: dict) -> None:
        if isinstance(op, CoarseCorrection):
            rec["coarse_dim"] = op.coarse_dim
            if self.record_gap:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    rec["gap"] = float(op.gap())
                    rec["logged_gap"] = float(op.logged_gap())
            if self.record_ratio:
                exact = op.exact
                z = exact.solve(rhs)
                e0 = float(exact.fisher_norm2(op.zeta_kfac - z))
                e = float(exact.fisher_norm2(zeta - z))
                rec["ratio"] = e / e0 if e0 > 0 else float("nan")
        else:  # one-level KFAC: β = 0
            if self.record_gap:
                rec["gap"] = 0.0
                rec["logged_gap"] = 0.0
            if self.record_ratio:
                rec["ratio"] = 1.0


class KFACOptimizer(_KFACBased):
    """KFAC (2.31): θ ← θ − α F•KFAC⁻¹(∇h + ωθ), F•KFAC = blockdiag(Ã_i ⊗ G̃_i) (2.30).

    Args: see :class:`FisherOptimizer` and :class:`_KFACBased` (``damping_mode``,
    ``factor_decay``, ``factor_update_period``, ``inverse_update_period``, ``fisher_subbatch``,
    ``protocol``: ``"released-code"`` is the released code's KFAC baseline, (A + √λI) ⊗ (G + √λI)).
    """

    def __init__(self, model: nn.Module, **kw: Any) -> None:
        super().__init__(model, **kw)
        self.method = "kfac" if self.damping_mode == "pi" else f"kfac-{self.damping_mode}"

    def _operator(self, jac: Jacobian, rhs: Tensor, damping: float) -> FisherOperator:
        return self._one_level(jac, damping)


class _CoarseBased(_KFACBased):
    """The two-level optimizers' shared state: the coarse matrix F̃ that β is solved with.

    Args (besides :class:`_KFACBased`'s; ``None`` takes the ``protocol``'s value):
        coarse_diagonal: ``"exact"`` (λR_0R_0ᵀ) or ``"layer-size"`` (λ·p_i per coarse column).
        coarse_normalization: ``"orthonormal"`` or ``"max-abs"`` (the released code's R_0).
        coefficient: c in ζ = ζ_KFAC + c·R_0ᵀβ.
        coarse_decay: ρ ∈ [0, 1) or ``"auto"``: F̃ ← ρF̃ + (1 − ρ)F_new on the refresh steps.
        coarse_update_period: T_c ≥ 1: F_new (the coarse matrix R_0F•R_0ᵀ, with the chosen
            diagonal, of the Fisher sub-batch or the batch, in the basis of that step) is computed
            on steps 1, 1 + T_c, …; in between F̃ is reused as it is with the basis of the current
            step — what the released code does (its basis is rebuilt every step, its F_coarse⁻¹
            kept). A basis whose coarse dimension changed refreshes F̃ at once.

    With the defaults (decay 0, T_c = 1, no sub-batch) β is solved with the exact F_coarse of the
    batch, as the paper's equations. :attr:`history` records ``gap`` (the true error change,
    against F• and ζ of the batch) and ``logged_gap`` (with F̃, as the released code logs it).

    Attributes:
        coarse_average: the current F̃ ``[m, m]`` (``None`` before the first step or when the
            exact batch matrix is used).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        coarse_diagonal: str | None = None,
        coarse_normalization: str | None = None,
        coefficient: float | None = None,
        coarse_decay: float | str | None = None,
        coarse_update_period: int | None = None,
        coarse_rhs: str | None = None,
        protocol: str | Protocol | None = None,
        **kw: Any,
    ) -> None:
        try:
            proto = Protocol.parse(protocol).with_options(
                coarse_diagonal=coarse_diagonal, coarse_normalization=coarse_normalization,
                coefficient=coefficient, coarse_decay=coarse_decay, coarse_update_period=coarse_update_period,
                coarse_rhs=coarse_rhs,
            )
            check_coarse_diagonal(proto.coarse_diagonal)
            check_coarse_normalization(proto.coarse_normalization)
            check_coefficient(proto.coefficient)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.coarse_decay = _decay("coarse_decay", proto.coarse_decay)
        self.coarse_update_period = _posint("coarse_update_period", proto.coarse_update_period)
        super().__init__(model, protocol=proto, **kw)
        self.coarse_average: Tensor | None = None

    @property
    def _approximate_coarse(self) -> bool:
        return self.coarse_decay != 0.0 or self.coarse_update_period > 1 or self.fisher_subbatch is not None

    def _operator_options(self) -> dict:
        p = self.protocol
        return dict(
            coarse_diagonal=p.coarse_diagonal, coarse_normalization=p.coarse_normalization, coefficient=p.coefficient,
        )

    def _coarse_matrix(self, pieces: dict, jac: Jacobian, damping: float) -> Tensor | None:
        """F̃ for this step (``None``: the exact batch matrix, the paper's)."""
        if not self._approximate_coarse:
            return None
        basis = pieces["basis"]
        due = self._due(self.coarse_update_period)
        if self.coarse_average is None or self.coarse_average.shape != (basis.m, basis.m):
            due, fresh = True, True
        else:
            fresh = False
        if not due:
            return self.coarse_average
        new = self._coarse_matrix_of(self._fisher_jacobian(jac), pieces, damping)
        rho = 0.0 if fresh else self._rho(self.coarse_decay)
        self.coarse_average = new if rho == 0.0 else rho * self.coarse_average + (1 - rho) * new
        return self.coarse_average

    def _coarse_matrix_of(self, jac: Jacobian, pieces: dict, damping: float) -> Tensor:
        return coarse_matrix(jac, pieces["basis"], damping=damping, diagonal=self.protocol.coarse_diagonal)

    def _extra_state(self) -> dict:
        d = super()._extra_state()
        d["coarse_average"] = None if self.coarse_average is None else self.coarse_average.clone()
        return d

    def _load_extra_state(self, d: dict) -> None:
        super()._load_extra_state(d)
        c = d.get("coarse_average")
        self.coarse_average = None if c is None else c.clone()


class TwoLevelKFACOptimizer(_CoarseBased):
    """Two-level KFAC (Algorithm 1): ζ = ζ_KFAC + R_0ᵀβ*, β* = F_coarse⁻¹R_0(w − F•ζ_KFAC) (3.9)–(3.11).

    Args:
        coarse: ``"nicolaides"`` (3.24), ``"spectral"`` (3.28, ``k`` eigenvectors),
            ``"krylov-nicolaides"`` (3.29, ``m`` columns), ``"residuals"`` (3.32),
            ``"krylov-residuals"`` (``m``), ``"taylor"`` (3.37)–(3.38), ``q`` columns.
        k, m, q: sizes of the spectral, Krylov and Taylor spaces.
        coarse_rhs: ``"residual"`` (R_0r, (3.11)) or ``"gradient"`` (R_0w, the released code's).
        fine_damping_mode: the fine level's damping mode (``damping_mode`` is accepted for it).
        conv_damping: ``"literal"`` or ``"released-code"`` (see :class:`_KFACBased`).
        Others: see :class:`FisherOptimizer`, :class:`_KFACBased` and :class:`_CoarseBased`.

    With the paper's options the gap (4.6) of each step is ≤ 0 (``record_gap=True``).
    """

    two_level = True

    def __init__(self, model: nn.Module, *, coarse: str = "nicolaides", k: int = 1, m: int = 2, q: int = 2, **kw: Any) -> None:
        if coarse not in COARSE_SPACES:
            raise ConfigError(f"unknown coarse space {coarse!r} (choose one of {', '.join(COARSE_SPACES)})")
        self.coarse = coarse
        self.k, self.m, self.q = _posint("k", k), _posint("m", m), _posint("q", q)
        super().__init__(model, **kw)
        try:
            self.coarse_rhs = check_coarse_rhs(self.protocol.coarse_rhs)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.method = coarse

    def _operator(self, jac: Jacobian, rhs: Tensor, damping: float) -> FisherOperator:
        kfac = self._one_level(jac, damping)
        exact = ExactFisher(jac, damping)
        opts = self._operator_options()
        pieces = TwoLevelKFAC._pieces_from_capture(
            jac, damping, self.coarse, kfac=kfac, exact=exact, rhs=rhs, k=self.k, m=self.m, q=self.q,
            coarse_normalization=opts.pop("coarse_normalization"),
        )
        pieces["protocol"] = self.protocol
        return TwoLevelKFAC(
            **pieces, **opts, coarse_rhs=self.coarse_rhs, coarse_matrix=self._coarse_matrix(pieces, jac, damping)
        )


class TKOOptimizer(_CoarseBased):
    """The additive two-level KFAC of Tselepidis, Kohler and Orvieto (PREVIOUS, (4.7), (3.17)).

    ζ = F•KFAC⁻¹w + R_0ᵀF_coarse⁻¹R_0w with F_coarse exact (3.12) or, as published, from the
    Kronecker cross-layer blocks (3.18) (Linear layers only).

    Args:
        coarse_operator: ``"exact"`` or ``"kronecker"``.
        coarse: the coarse space (default Nicolaides, as published); k, m, q as in
            :class:`TwoLevelKFACOptimizer`. Others: see :class:`_KFACBased` and
            :class:`_CoarseBased` (the right-hand side is R_0w by definition).

    Its gap (4.6) may be positive.
    """

    two_level = True

    def __init__(
        self, model: nn.Module, *, coarse_operator: str = "exact", coarse: str = "nicolaides",
        k: int = 1, m: int = 2, q: int = 2, coarse_rhs: str | None = None, **kw: Any,
    ) -> None:
        if coarse_rhs not in (None, "gradient"):
            raise ConfigError(f"TKO's coarse right-hand side is R_0w by definition (4.7b); coarse_rhs={coarse_rhs!r} is not an option")
        if coarse_operator not in ("exact", "kronecker"):
            raise ConfigError(f"coarse_operator must be 'exact' or 'kronecker', got {coarse_operator!r}")
        if coarse not in COARSE_SPACES:
            raise ConfigError(f"unknown coarse space {coarse!r} (choose one of {', '.join(COARSE_SPACES)})")
        self.coarse_operator = coarse_operator
        self.coarse = coarse
        self.k, self.m, self.q = _posint("k", k), _posint("m", m), _posint("q", q)
        super().__init__(model, **kw)
        self.method = "tko" if coarse_operator == "exact" else "tko-kronecker"

    def _operator(self, jac: Jacobian, rhs: Tensor, damping: float) -> FisherOperator:
        kfac = self._one_level(jac, damping)
        exact = ExactFisher(jac, damping)
        opts = self._operator_options()
        pieces = TKO._pieces_from_capture(
            jac, damping, self.coarse, kfac=kfac, exact=exact, rhs=rhs, k=self.k, m=self.m, q=self.q,
            coarse_normalization=opts.pop("coarse_normalization"),
        )
        pieces["protocol"] = self.protocol
        return TKO(
            **pieces, **opts, coarse_operator=self.coarse_operator,
            coarse_matrix=self._coarse_matrix(pieces, jac, damping),
        )

    def _coarse_matrix_of(self, jac: Jacobian, pieces: dict, damping: float) -> Tensor:
        if self.coarse_operator == "exact":
            return super()._coarse_matrix_of(jac, pieces, damping)
        sub = TKO(pieces["base"], ExactFisher(jac, damping), pieces["basis"], coarse_operator="kronecker",
                  coarse_diagonal=self.protocol.coarse_diagonal)
        return sub.F_tko


class NaturalGradient(FisherOptimizer):
    """The exact regularized natural gradient ζ = F•⁻¹w (3.2), by Woodbury (MATH.md §3), or its
    exact block-diagonal version (3.7) with ``block_diagonal=True``.

    Args:
        block_diagonal: use blockdiag([F•]_11, …, [F•]_ℓℓ) instead of F•.
        fisher_subbatch: ``None`` (the batch) or the Fisher of a sub-batch drawn with replacement
            (a size, or a fraction of B; :class:`_KFACBased`); the released code's exact NG used
            64 examples (``ExactNG(batch_size=64)``) — not read from ``protocol``.
        solver: for the full F•: ``"auto"`` (Woodbury unless the N × N matrix is too large, then
            KFAC-preconditioned CG), ``"woodbury"`` or ``"cg"``.
        Others: see :class:`FisherOptimizer`.

    ``history`` has no gap; ``ratio`` (``record_ratio=True``) is 0 for the full F• and
    𝔈(ζ_block)/𝔈(ζ_KFAC) (π-damped batch KFAC) for the block diagonal.
    """

    def __init__(
        self, model: nn.Module, *, block_diagonal: bool = False, solver: str = "auto",
        fisher_subbatch: int | float | None = None, **kw: Any,
    ) -> None:
        if solver not in ("auto", "woodbury", "cg"):
            raise ConfigError(f"solver must be 'auto', 'woodbury' or 'cg', got {solver!r}")
        self.block_diagonal = bool(block_diagonal)
        self.solver = solver
        self.fisher_subbatch = _subbatch(fisher_subbatch)
        super().__init__(model, **kw)
        self.method = "block-diagonal" if self.block_diagonal else "exact"

    def _operator(self, jac: Jacobian, rhs: Tensor, damping: float) -> FisherOperator:
        jac = self._fisher_jacobian(jac)
        if self.block_diagonal:
            return BlockDiagonalFisher(jac, damping)
        return ExactFisher(jac, damping, solver=self.solver)  # type: ignore[arg-type]

    def _record(self, op: FisherOperator, rhs: Tensor, zeta: Tensor, rec: dict) -> None:
        if not self.record_ratio:
            return
        if not self.block_diagonal:
            rec["ratio"] = 0.0
            return
        exact = ExactFisher(op.jac, op.damping)  # type: ignore[attr-defined]
        z = exact.solve(rhs)
        zk = KFAC.from_capture(op.jac, op.damping, "pi").solve(rhs)  # type: ignore[attr-defined]
        e0 = float(exact.fisher_norm2(zk - z))
        rec["ratio"] = float(exact.fisher_norm2(zeta - z)) / e0 if e0 > 0 else float("nan")


class MethodOptimizer(FisherOptimizer):
    """Any registered method as an optimizer: ζ = op⁻¹w with ``op = fisherlab.methods.build(method,
    batch Jacobian, λ, rhs=w, **method_options)`` rebuilt every step (no running averages).

    This is how a method added to :data:`fisherlab.methods.METHODS` becomes an optimizer without
    further code (e.g. ``diagonal``).

    Args:
        method: a key of :data:`fisherlab.methods.METHODS`.
        method_options: the method's options (``{"m": 3}``, ``{"base": "diagonal"}``).
        Others: see :class:`FisherOptimizer`.
    """

    def __init__(self, model: nn.Module, *, method: str, method_options: dict | None = None, **kw: Any) -> None:
        self.method_record = registry.get(method)
        self.method_options = self.method_record.resolve_options(method_options or {})
        self.storage = self.method_record.storage
        super().__init__(model, **kw)
        self.method = method

    def _operator(self, jac: Jacobian, rhs: Tensor, damping: float) -> FisherOperator:
        return registry.build(self.method, jac, damping, rhs=rhs, **self.method_options)


# ---------------------------------------------------------------------------------------------
# registry: name -> factory(model, **options), derived from fisherlab.methods
# ---------------------------------------------------------------------------------------------


def _two_level(coarse: str) -> Callable[..., torch.optim.Optimizer]:
    def make(model: nn.Module, **kw: Any) -> torch.optim.Optimizer:
        kw.setdefault("coarse", coarse)
        return TwoLevelKFACOptimizer(model, **kw)

    make.__doc__ = f"Two-level KFAC with the '{coarse}' coarse space."
    return make


def _generic(method: str) -> Callable[..., torch.optim.Optimizer]:
    def make(model: nn.Module, **kw: Any) -> torch.optim.Optimizer:
        return MethodOptimizer(model, method=method, **kw)

    make.__doc__ = f"The '{method}' method as an optimizer (MethodOptimizer)."
    return make


def _factory(key: str) -> Callable[..., torch.optim.Optimizer]:
    """The optimizer of a registered method: the KFAC family keeps running factors and reuses its
    eigenbases (:class:`_KFACBased`); every other method is a :class:`MethodOptimizer`."""
    family = registry.get(key).family
    if key == "kfac":
        return lambda model, **kw: KFACOptimizer(model, **kw)
    if key == "kfac-tikhonov":
        return lambda model, **kw: KFACOptimizer(model, **{"damping_mode": "tikhonov", **kw})
    if family is Family.MULTIPLICATIVE:
        return _two_level(key)
    if key in ("tko", "tko-kronecker"):
        op = "exact" if key == "tko" else "kronecker"
        return lambda model, **kw: TKOOptimizer(model, **{"coarse_operator": op, **kw})
    if key == "exact":
        return lambda model, **kw: NaturalGradient(model, **kw)
    if key == "block-diagonal":
        return lambda model, **kw: NaturalGradient(model, **{"block_diagonal": True, **kw})
    return _generic(key)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "two-level-kfac": lambda model, **kw: TwoLevelKFACOptimizer(model, **kw),
    **{m.optimizer: _factory(k) for k, m in registry.METHODS.items() if m.optimizer},
}
"""fisherlab's optimizers by name (one per registered method with an ``optimizer`` name, plus
``two-level-kfac``, which takes ``coarse``): ``factory(model, **options)``; options are the
keyword arguments of the classes (``lr``, ``damping``, ``loss``, ``fisher``, ``n_samples``,
``weight_decay``, ``momentum``, ``damping_mode``, ``factor_decay``, ``inverse_update_period``,
``coarse``, ``k``, ``m``, ``q``, ``seed``, ``record_gap``, ``record_ratio``, ``method_options``, …,
and the protocol options — ``protocol``, ``fine_damping_mode``, ``conv_damping``,
``factor_update_period``, ``fisher_subbatch``, ``coarse_rhs``, ``coarse_diagonal``,
``coarse_normalization``, ``coefficient``, ``coarse_decay``, ``coarse_update_period``,
``weight_decay_mode``, ``kl_clip``; docs/PROTOCOL.md).
``kfac-2l-<space>`` fixes the coarse space."""

LEGENDS = {name: registry.legend(name) for name in OPTIMIZERS}
"""Figure legends, from :mod:`fisherlab.methods` (the paper's Table 1 for the two-level methods)."""


def make_optimizer(name: str, model: nn.Module, **options: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` (see :data:`OPTIMIZERS`) for ``model``.

    Raises:
        ValueError: an unknown name, an option the optimizer does not take, a missing required
            option (``lr``, ``damping``, ``loss``) or a bad value — one line each.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown fisherlab optimizer {name!r} (choose one of {', '.join(OPTIMIZERS)})")
    try:
        return OPTIMIZERS[name](model, **options)
    except TypeError as err:
        msg = str(err)
        if "unexpected keyword argument" in msg:
            raise ConfigError(f"optimizer {name!r} does not take the option {msg.split('argument')[-1].strip()}") from None
        if "required keyword-only argument" in msg:
            raise ConfigError(f"optimizer {name!r} needs the option(s) {msg.split(':', 1)[-1].strip()}") from None
        raise


def training_factory(name: str) -> Callable[..., torch.optim.Optimizer]:
    """A :mod:`fisherlab.train` factory ``factory(params, config, *, model)`` for optimizer ``name``.

    The options come from the :class:`~fisherlab.train.TrainConfig`: ``lr``, ``momentum``,
    ``weight_decay``, ``loss`` and ``seed`` (the MC generator), then ``optimizer_options``
    (``damping`` — required, never implied here: a number (absolute λ) or ``{"value": α, "scale":
    "max"}`` (a :class:`~fisherlab.Damping`); the CLI's ``train`` defaults it to 1e-3·λ_max —, ``fisher``, ``n_samples``, ``damping_mode``,
    ``factor_decay``, ``inverse_update_period``, ``coarse``, ``k``/``m``/``q``,
    ``record_gap``, ``record_ratio``, …), which override the former.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown fisherlab optimizer {name!r} (choose one of {', '.join(OPTIMIZERS)})")

    def factory(params: list[nn.Parameter], config: Any, *, model: nn.Module) -> torch.optim.Optimizer:
        mine = {id(p) for p in model.parameters()}
        if any(id(p) not in mine for p in params):
            raise ConfigError(f"optimizer {name!r}: the parameters given are not the model's")
        options: dict[str, Any] = {
            "lr": config.lr,
            "momentum": config.momentum,
            "weight_decay": config.weight_decay,
            "loss": config.loss,
            "seed": config.seed,
        }
        options.update(config.optimizer_options or {})
        if isinstance(options.get("damping"), dict):  # {"value": α, "scale": "max"} from a JSON config
            spec = options["damping"]
            if set(spec) - {"value", "scale"} or "value" not in spec:
                raise ConfigError(f"optimizer {name!r}: damping is a number or {{\"value\": α, \"scale\": …}}, got {spec!r}")
            options["damping"] = Damping(spec["value"], spec.get("scale", "absolute"))
        if "damping" not in options:
            raise ConfigError(
                f"optimizer {name!r} needs the damping λ > 0: set optimizer_options.damping in the training config"
            )
        return make_optimizer(name, model, **options)

    factory.__doc__ = f"fisherlab optimizer {name!r} ({LEGENDS[name]}) for fisherlab.train."
    return factory


def register_training_optimizers(registry: dict[str, Callable[..., torch.optim.Optimizer]]) -> None:
    """Add every :data:`OPTIMIZERS` name to the training registry (``fisherlab.train.OPTIMIZERS``),
    without replacing an entry already there."""
    for name in OPTIMIZERS:
        registry.setdefault(name, training_factory(name))
