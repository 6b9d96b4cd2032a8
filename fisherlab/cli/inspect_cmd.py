"""``fisherlab inspect FILE``: checkpoints, layers, shapes, storage, modes and sizes of a capture file."""

from __future__ import annotations

import argparse
import json

from .. import store
from ..errors import StoreError
from ..io.tables import text_table
from ._common import FORMATTER

MiB = 2**20


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="print the checkpoints, layers, shapes, modes and sizes of a capture file",
        description="Print what a fisherlab HDF5 capture file holds: run metadata, every checkpoint "
        "(complete or not), and the layer table of one checkpoint with shapes, storage and sizes.",
        formatter_class=FORMATTER,
    )
    p.add_argument("file", metavar="FILE", help="a fisherlab HDF5 file")
    p.add_argument("--checkpoint", "-c", help="show the layers of this checkpoint (default: the last complete one)")
    p.set_defaults(func=run)


def _mib(n: int) -> str:
    return f"{n / MiB:.2f}" if n >= 0 else "?"


def format_info(info: dict, checkpoint: str | None = None) -> str:
    """The text ``fisherlab inspect`` prints, from :func:`fisherlab.store.file_info`."""
    layout = info["layout"]
    ckpts: list[store.CheckpointInfo] = info["checkpoints"]
    complete = [c for c in ckpts if c.complete]
    model = dict(info.get("model") or {})
    model_line = model.pop("name", None) or "(not described)"
    if model:
        model_line += " " + json.dumps(model, sort_keys=True)
    lines = [
        f"{info['path']}: fisherlab file, schema {info['schema_version']}, written by fisherlab "
        f"{info['fisherlab_version']} on {info['created']}, {_mib(info['file_bytes'])} MiB on disk",
        f"model:  {model_line}",
        f"run:    loss={info['loss']}  fisher={info['fisher']}  K={info['n_vectors']}  B={info['batch_size']}  "
        f"N={info['n_vectors'] * info['batch_size']}  p={layout.p:,} in {len(layout)} layers",
    ]
    if layout.excluded:
        lines.append("        not in the Fisher: " + ", ".join(layout.excluded))
    lines.append("")
    lines.append(f"checkpoints: {len(complete)} complete, {len(ckpts) - len(complete)} incomplete")
    if ckpts:
        rows = [["name", "step", "status", "seed", "loss", "dtype", "data MiB", "stored MiB", "batch"]]
        for c in ckpts:
            batch = ""
            if c.batch_indices is not None:
                bi = c.batch_indices
                batch = "[" + ", ".join(map(str, bi[:4])) + (", …" if len(bi) > 4 else "") + f"] ({len(bi)})"
            rows.append([
                c.name,
                "-" if c.step is None else str(c.step),
                c.status,
                "-" if c.seed is None else str(c.seed),
                "-" if c.loss_value is None else f"{c.loss_value:.6g}",
                c.dtype or "-",
                _mib(c.nbytes) if c.complete else "-",
                _mib(c.stored_bytes) if c.complete else "-",
                batch,
            ])
        lines += text_table(rows, right={1, 6, 7})
    shown = None
    if checkpoint is not None:
        shown = next((c for c in complete if c.name == checkpoint), None)
        if shown is None:
            names = ", ".join(c.name for c in complete) or "none"
            raise StoreError(f"{info['path']}: no complete checkpoint '{checkpoint}' (complete checkpoints: {names})")
    elif complete:
        shown = complete[-1]
    if shown is not None:
        lines.append("")
        lines.append(f"layers of checkpoint '{shown.name}':")
        rows = [["#", "name", "kind", "d_out", "d_in'", "T", "p_i", "storage", "datasets", "MiB", "compression"]]
        for li, spec in zip(shown.layers, layout.layers):
            ds = "  ".join(f"{d.name} {list(d.shape)}" for d in li.datasets)
            comp = sorted({d.compression or "none" for d in li.datasets})
            rows.append([
                str(li.index), li.name, li.kind, str(spec.d_out), str(spec.d_in_bar), str(li.positions),
                f"{spec.numel:,}", li.storage, ds, _mib(sum(d.nbytes for d in li.datasets)), ",".join(comp),
            ])
        lines += text_table(rows, right={0, 3, 4, 5, 6, 9})
        extra = "  ".join(f"{d.name} {list(d.shape)} {d.dtype}" for d in shown.datasets)
        lines.append(f"  also: {extra}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(format_info(store.file_info(args.file), args.checkpoint))
    return 0
