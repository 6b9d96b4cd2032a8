"""Training with checkpoints: the source of the captures.

:func:`train` runs mini-batch training of a :mod:`fisherlab.models` network on a
:mod:`fisherlab.datasets` set and writes, into ``out_dir``::

    run.json                      model description, run config, data summary, checkpoint list
    metrics.csv                   one row per step: step, epoch, loss, wall_time, lr (+ extras)
    loss.png, loss.pdf            the training loss
    checkpoints/step_000100.pt    model.state_dict() after 100 updates (load with weights_only=True)
    checkpoints/step_000100.json  its sidecar: step, epoch, loss, model description, run config

(The folder's names belong to :mod:`fisherlab.runs`, which also loads it back:
:func:`load_checkpoint`.)

Conventions:

* Step s of the CSV is the s-th update; its ``loss`` is the mini-batch loss *before* that update
  (the loss the gradient was taken of). Checkpoint ``step_s`` holds the parameters *after* s
  updates; ``step_000000`` is the initialization.
* The loss is the mean over the batch of the per-example losses of
  :mod:`fisherlab.capturing.losses` (``bce_logits`` sums over outputs, ``mse`` is ½‖y − z‖²),
  the same numbers a capture reports.
* Batches: a seeded permutation per epoch; the last incomplete batch of an epoch is dropped, so
  every step sees ``batch_size`` examples.
* Seeds: the model is built with ``seed``, the batch order drawn from ``seed``, and torch's
  global RNG is seeded with ``seed`` (for optimizers that sample); the data with ``data_seed``.

Optimizers come from the registry :data:`OPTIMIZERS`: ``sgd``, ``adam`` and every curvature
optimizer of :mod:`fisherlab.optim` (KFAC, two-level KFAC, TKO, NGD). Others add factories to it
(see :func:`register_optimizer`). A factory is called as ``factory(params, config, model=model)``
(curvature optimizers hook the layers). An optimizer with a ``set_batch(x, y)`` method is
given each batch before its step. An optimizer whose class sets ``wants_closure = True``
is stepped as ``loss = optimizer.step(closure)`` where ``closure()`` zeroes the gradients,
runs forward and backward on the current batch and returns the loss; others are stepped after
one ``closure()``. If the optimizer has a dict attribute ``last_metrics`` (e.g. the gap (4.6)),
its entries are added to that step's CSV row. A callback ``cb(step, model, batch, loss)`` runs
after every update; a dict it returns is added to the row too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from . import datasets as D
from . import models as M
from . import runs
from ._validate import bounded, nonnegative_int, parse_enum, positive_int
from .capturing import losses as L
from .errors import ConfigError, MissingFileError, NonFiniteError
from .io.tables import write_csv, write_json
from .optim import register_training_optimizers
from .runs import load_checkpoint

__all__ = [
    "OPTIMIZERS",
    "Callback",
    "TrainConfig",
    "TrainResult",
    "load_checkpoint",
    "register_optimizer",
    "train",
]

OptimizerFactory = Callable[..., torch.optim.Optimizer]
"""``factory(params: list[nn.Parameter], config: TrainConfig, *, model: nn.Module) -> Optimizer``."""

Callback = Callable[[int, nn.Module, tuple[Tensor, Tensor], float], "dict | None"]
"""``callback(step, model, (x, y), loss) -> dict | None``, called after every update."""

_TASK_OF_LOSS = {"bce_logits": "autoencoder", "cross_entropy": "classification", "mse": "regression"}


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything that defines a training run (JSON-able; :meth:`to_dict` / :meth:`from_dict`).

    Attributes:
        model: a model description (:func:`fisherlab.models.describe`) or a bare name.
        data: a :mod:`fisherlab.datasets` name; ``None`` takes the model's default data.
        n: number of training examples (``None``: the whole set).
        data_seed: seed of the data subset / generator.
        loss: ``bce_logits``, ``cross_entropy`` or ``mse``; ``None`` takes the model's default.
            It also picks the data task (autoencoder, classification, regression).
        batch_size: examples per step.
        epochs: passes over the data (ignored when ``steps`` is given).
        steps: number of updates; overrides ``epochs``.
        optimizer: a key of :data:`OPTIMIZERS` (``sgd``, ``adam``, or one registered later).
        lr: learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 weight decay passed to the optimizer.
        optimizer_options: further keyword arguments for the optimizer factory
            (e.g. ``{"nesterov": true}``, ``{"betas": [0.9, 0.99]}``, a curvature optimizer's damping).
        seed: model initialization, batch order and torch's global RNG.
        checkpoint_every: write a checkpoint every this many steps (step 0 included).
        checkpoint_steps: explicit steps to checkpoint (combined with ``checkpoint_every``).
        checkpoint_final: also checkpoint the last step.
        device: ``"cuda"``, ``"cpu"``, … ; ``None`` picks CUDA when available.
        progress: show a tqdm progress bar.
        plot: write ``loss.png`` and ``loss.pdf``.
    """

    model: dict | str = "mnist-ae"
    data: str | None = None
    n: int | None = 1000
    data_seed: int = 0
    loss: str | None = None
    batch_size: int = 100
    epochs: int = 1
    steps: int | None = None
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer_options: dict = field(default_factory=dict)
    seed: int = 0
    checkpoint_every: int | None = None
    checkpoint_steps: list[int] | None = None
    checkpoint_final: bool = True
    device: str | None = None
    progress: bool = True
    plot: bool = True

    # ---- (de)serialization -------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-able dict; the model as its full description."""
        d = dataclasses.asdict(self)
        d["model"] = self.description
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a dict (e.g. a JSON config file); unknown keys raise a one-line :class:`ConfigError`."""
        if not isinstance(d, dict):
            raise ConfigError(f"a training config must be a JSON object, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(
                f"training config: unknown key(s) {', '.join(map(repr, unknown))} (valid: {', '.join(names)})"
            )
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "TrainConfig":
        """Read a JSON config file."""
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise MissingFileError(f"training config file not found: {p}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"training config {p}: invalid JSON ({err})") from None
        return cls.from_dict(d)

    # ---- derived -----------------------------------------------------------------------
    @property
    def description(self) -> dict:
        """The full model description."""
        m = self.model
        return M.describe(m) if isinstance(m, str) else M.describe(m["name"], **{k: v for k, v in m.items() if k != "name"})

    def resolved(self, *, check_optimizer: bool = True) -> "TrainConfig":
        """A copy with ``model``, ``data`` and ``loss`` filled in and every field checked.

        Args:
            check_optimizer: require ``optimizer`` to be a key of :data:`OPTIMIZERS` (off when
                :func:`train` is given an ``optimizer_factory``).

        Raises:
            ConfigError: a bad field (one line naming it; a ValueError).
        """
        desc = self.description
        if not (self.loss or desc["loss"]):
            raise ConfigError(f"training config: model '{desc['name']}' does not say its loss; set 'loss' (--loss)")
        loss = parse_enum(self.loss or desc["loss"], list(_TASK_OF_LOSS), "training config: 'loss'")
        data = self.data or M.default_data(desc)
        if data is None:
            raise ConfigError(f"training config: model '{desc['name']}' has no embedded data; set 'data' (--data)")
        if data not in D.available() and not D.is_user_data(data):
            raise ConfigError(f"training config: unknown data {data!r} (valid names: {', '.join(D.available())})")
        for key in ("batch_size", "epochs"):
            positive_int(getattr(self, key), f"training config: '{key}'")
        if self.steps is not None:
            nonnegative_int(self.steps, "training config: 'steps'")
        if self.checkpoint_every is not None:
            positive_int(self.checkpoint_every, "training config: 'checkpoint_every'")
        for s in self.checkpoint_steps or ():
            nonnegative_int(s, "training config: 'checkpoint_steps'")
        bounded(self.lr, "training config: 'lr'", 0.0, lo_open=True)
        if check_optimizer and self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"training config: unknown optimizer {self.optimizer!r} (registered: {', '.join(OPTIMIZERS)})"
            )
        return dataclasses.replace(self, model=desc, data=data, loss=loss)

    def checkpoint_schedule(self, total_steps: int) -> list[int]:
        """The sorted steps in ``[0, total_steps]`` at which a checkpoint is written."""
        steps: set[int] = set()
        if self.checkpoint_every:
            steps.update(range(0, total_steps + 1, self.checkpoint_every))
        if self.checkpoint_steps:
            steps.update(s for s in self.checkpoint_steps if s <= total_steps)
        if self.checkpoint_final:
            steps.add(total_steps)
        return sorted(steps)


# --------------------------------------------------------------------------------------------
# optimizers
# --------------------------------------------------------------------------------------------


def _sgd(params: list[nn.Parameter], config: TrainConfig, *, model: nn.Module | None = None) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
        **config.optimizer_options,
    )


def _adam(params: list[nn.Parameter], config: TrainConfig, *, model: nn.Module | None = None) -> torch.optim.Optimizer:
    opts = dict(config.optimizer_options)
    if "betas" in opts:
        opts["betas"] = tuple(opts["betas"])
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, **opts)


OPTIMIZERS: dict[str, OptimizerFactory] = {"sgd": _sgd, "adam": _adam}
"""Optimizer factories by name: ``sgd``, ``adam`` and :mod:`fisherlab.optim`'s (kfac,
kfac-tikhonov, two-level-kfac, kfac-2l-<space>, tko, tko-kronecker, ngd, ngd-block); add
entries (or use :func:`register_optimizer`) to plug in more."""
register_training_optimizers(OPTIMIZERS)


def register_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Decorator: ``@register_optimizer("mine") def make(params, config, *, model): ...``."""

    def deco(fn: OptimizerFactory) -> OptimizerFactory:
        OPTIMIZERS[name] = fn
        return fn

    return deco


def _make_optimizer(factory: OptimizerFactory, model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = factory(params, config, model=model)
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(f"optimizer factory for '{config.optimizer}' returned {type(opt).__name__}, not a torch.optim.Optimizer")
    return opt


# --------------------------------------------------------------------------------------------
# results and files
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained model (on the training device, in eval mode).
        description: its model description.
        config: the resolved config.
        metrics: one dict per step (the rows of ``metrics.csv``).
        checkpoints: paths of the ``.pt`` checkpoints written, in step order.
        out_dir: the output folder (``None`` when nothing was written).
        steps: number of updates done.
        wall_time: seconds of training.
        device: the device trained on.
    """

    model: nn.Module
    description: dict
    config: TrainConfig
    metrics: list[dict]
    checkpoints: list[Path]
    out_dir: Path | None
    steps: int
    wall_time: float
    device: str

    @property
    def losses(self) -> list[float]:
        """The per-step losses."""
        return [r["loss"] for r in self.metrics]

    @property
    def final_loss(self) -> float:
        """The loss of the last step (``nan`` without steps)."""
        return self.metrics[-1]["loss"] if self.metrics else float("nan")


_METRIC_COLUMNS = ["step", "epoch", "loss", "wall_time", "lr"]


def _write_csv(path: Path, rows: Sequence[dict]) -> None:
    write_csv(rows, path, None if rows else _METRIC_COLUMNS)


def plot_losses(rows: Sequence[dict], out_dir: Path, title: str = "") -> list[Path]:
    """Write ``loss.png`` and ``loss.pdf``: the per-step loss and its running mean."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    if rows:
        k = max(1, len(loss) // 25)
        ax.plot(steps, loss, lw=0.8 if k > 1 else 1.6, alpha=0.45 if k > 1 else 1.0, label="mini-batch loss")
        if k > 1:
            smooth = [sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]
            ax.plot(steps, smooth, lw=1.6, label=f"running mean ({k} steps)")
        if all(v > 0 for v in loss):
            ax.set_yscale("log")
        ax.legend(frameon=False)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    paths = [out_dir / "loss.png", out_dir / "loss.pdf"]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterable[tuple[int, Tensor]]:
    """Endless ``(epoch, indices)``: a fresh permutation per epoch, full batches only."""
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - batch_size + 1, batch_size):
            yield epoch, perm[s : s + batch_size]
        epoch += 1


def train(
    config: TrainConfig | dict,
    out_dir: str | os.PathLike | None = None,
    *,
    optimizer_factory: OptimizerFactory | None = None,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train ``config.model`` on ``config.data`` and write checkpoints, metrics and plots.

    Args:
        config: a :class:`TrainConfig` (or a dict for :meth:`TrainConfig.from_dict`).
        out_dir: the output folder (created); ``None`` writes nothing (metrics stay in memory).
        optimizer_factory: overrides ``OPTIMIZERS[config.optimizer]``; called as
            ``factory(params, config, model=model)``.
        callbacks: ``cb(step, model, (x, y), loss)`` after every update; a returned dict is
            added to the step's metrics row.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: a bad config (one line; a ValueError).
        NonFiniteError: a non-finite loss (naming the step; a ValueError).
    """
    from .io.progress import tqdm

    cfg = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    cfg = cfg.resolved(check_optimizer=optimizer_factory is None)
    desc = cfg.model
    assert isinstance(desc, dict)
    device = torch.device(cfg.device) if cfg.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    data = D.load(cfg.data, n=cfg.n, seed=cfg.data_seed, task=_TASK_OF_LOSS[cfg.loss])
    if desc["input_shape"] is not None and tuple(data.input_shape) != tuple(desc["input_shape"]) and math.prod(data.input_shape) != math.prod(desc["input_shape"]):
        raise ConfigError(
            f"data '{cfg.data}' has inputs of shape {list(data.input_shape)} but model '{desc['name']}' "
            f"expects {desc['input_shape']}"
        )
    n = len(data)
    if cfg.batch_size > n:
        raise ConfigError(f"training config: batch_size={cfg.batch_size} exceeds the n={n} examples of '{cfg.data}'")
    steps_per_epoch = n // cfg.batch_size
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    schedule = set(cfg.checkpoint_schedule(total)) if out_dir is not None else set()

    torch.manual_seed(cfg.seed)
    model = M.build(desc, seed=cfg.seed).to(device)
    model.train()
    opt = _make_optimizer(optimizer_factory or OPTIMIZERS[cfg.optimizer], model, cfg)
    wants_closure = bool(getattr(opt, "wants_closure", False))
    data = data.to(device)
    loss_kind = L.Loss(cfg.loss)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = _batches(n, cfg.batch_size, gen)

    out: Path | None = None
    ckpt_dir: Path | None = None
    if out_dir is not None:
        out = Path(out_dir)
        ckpt_dir = runs.checkpoint_path(out, 0).parent
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    run_info = {
        "model": desc,
        "config": cfg.to_dict(),
        "data": data.describe(),
        "device": str(device),
        "steps": total,
        "steps_per_epoch": steps_per_epoch,
        "checkpoints": [],
    }
    checkpoints: list[Path] = []
    rows: list[dict] = []
    last_loss = float("nan")
    t0 = time.perf_counter()

    def save_checkpoint(step: int) -> None:
        assert ckpt_dir is not None and out is not None
        path = runs.save_state_dict(model, runs.checkpoint_path(out, step))
        side = {
            "step": step,
            "epoch": step / steps_per_epoch,
            "loss": last_loss if step > 0 else None,
            "file": path.name,
            "model": desc,
            "config": run_info["config"],
            "data": run_info["data"],
        }
        runs.write_sidecar(path, side)
        checkpoints.append(path)
        run_info["checkpoints"].append({"step": step, "file": f"{runs.CHECKPOINT_DIR}/{path.name}"})
        write_json(run_info, out / runs.RUN_JSON)
        _write_csv(out / "metrics.csv", rows)

    if 0 in schedule:
        save_checkpoint(0)
    title = f"{desc['name']} (width {desc['width']:g}) on {cfg.data}, {cfg.optimizer} lr={cfg.lr:g}, B={cfg.batch_size}"
    bar = tqdm(total=total, desc=f"train {desc['name']}", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    try:
        for step in range(1, total + 1):
            epoch, idx = next(batches)
            idx = idx.to(device)
            x, y = data.batch(idx)

            def closure() -> Tensor:
                opt.zero_grad(set_to_none=True)
                z = model(x).reshape(x.shape[0], -1)
                loss = L.per_example_loss(loss_kind, z, y).mean()
                loss.backward()
                return loss

            if hasattr(opt, "set_batch"):  # curvature optimizers capture the batch (fisherlab.optim)
                opt.set_batch(x, y)
            if wants_closure:
                loss_t = opt.step(closure)
            else:
                loss_t = closure()
                opt.step()
            loss_v = float(loss_t.detach()) if isinstance(loss_t, Tensor) else float(loss_t)
            if not math.isfinite(loss_v):
                raise NonFiniteError(
                    f"training diverged: non-finite loss {loss_v} at step {step} "
                    f"({cfg.optimizer}, lr={cfg.lr:g}); lower the learning rate"
                )
            last_loss = loss_v
            row = {
                "step": step,
                "epoch": step / steps_per_epoch,
                "loss": loss_v,
                "wall_time": time.perf_counter() - t0,
                "lr": opt.param_groups[0].get("lr", cfg.lr),
            }
            extra = getattr(opt, "last_metrics", None)
            if isinstance(extra, dict):
                row.update({k: _scalar(v) for k, v in extra.items()})
            for cb in callbacks:
                got = cb(step, model, (x, y), loss_v)
                if isinstance(got, dict):
                    row.update({k: _scalar(v) for k, v in got.items()})
            rows.append(row)
            if step in schedule:
                save_checkpoint(step)
            bar.update(1)
            if step % 10 == 0 or step == total:
                bar.set_postfix(loss=f"{loss_v:.4g}", epoch=f"{step / steps_per_epoch:.2f}")
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    model.eval()
    if out is not None:
        run_info["wall_time"] = wall
        run_info["final_loss"] = last_loss
        write_json(run_info, out / runs.RUN_JSON)
        _write_csv(out / "metrics.csv", rows)
        if cfg.plot:
            plot_losses(rows, out, title)
    return TrainResult(model, desc, cfg, rows, checkpoints, out, total, wall, str(device))


def _scalar(v: Any) -> Any:
    if isinstance(v, Tensor):
        return float(v.detach()) if v.numel() == 1 else v.detach().cpu().tolist()
    return v
