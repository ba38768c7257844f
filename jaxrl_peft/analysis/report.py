"""Writes spectral-analysis records (spectral.analyze_run) as per-layer JSON, a markdown summary and PNG plots.

Plots need matplotlib (the `plots` extra); everything else needs only the standard library and numpy.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

PLOTS_EXTRA_HINT = "pip install 'jaxrl-peft[plots]' (or: pip install matplotlib)"


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or an ImportError that says what to install."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"spectral plots need matplotlib: {PLOTS_EXTRA_HINT}") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def by_layer(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{'layer_03': {module: record}, ..., 'other': {name: record}} (modules outside decoder blocks in 'other')."""
    out: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        if r["layer"] is None:
            out["other"][r["name"]] = r
        else:
            out[f"layer_{r['layer']:03d}"][r["module"]] = r
    return dict(out)


def write_json(records: list[dict[str, Any]], out_dir: str | Path, meta: dict[str, Any] | None = None) -> list[Path]:
    """One JSON per layer under out_dir/per_layer/, and out_dir/spectral.json holding `meta` and every record."""
    out_dir = Path(out_dir)
    (out_dir / "per_layer").mkdir(parents=True, exist_ok=True)
    written = []
    for layer, modules in sorted(by_layer(records).items()):
        path = out_dir / "per_layer" / f"{layer}.json"
        path.write_text(json.dumps(modules, indent=1))
        written.append(path)
    path = out_dir / "spectral.json"
    path.write_text(json.dumps({"meta": meta or {}, "records": records}, indent=1))
    return written + [path]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def summary_markdown(records: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    """Markdown: the run's settings, means per module kind, then one row per adapted matrix."""
    lines = ["# Spectral analysis of the weight update", ""]
    for key, value in (meta or {}).items():
        lines.append(f"- {key}: `{value}`")
    lines += ["", f"{len(records)} adapted matrices. Shares are of ‖ΔK‖² (bins: deciles of w0's singular "
              "indices, top first); top/bottom half = deciles 0-4 / 5-9 (+ the part outside w0's span).", ""]
    head = ("| {} | ‖ΔK‖/‖W0‖ | cosine | ΔK top1 | ΔK eff. rank | rank_w_90 | ΔK in top-90% W (in / out) "
            "| top half (in / out) | max drift | max angle (in / out) |")
    sep = "|---" * 10 + "|"

    def row(label: str, rs: list[dict[str, Any]]) -> str:
        top_in = _mean([sum(r["bins_input"][:5]) for r in rs])
        top_out = _mean([sum(r["bins_output"][:5]) for r in rs])
        return (f"| {label} | {_mean([r['dw_rel_norm'] for r in rs]):.3g} | {_mean([r['cosine'] for r in rs]):.6f} "
                f"| {_mean([r['dw_top1_energy'] for r in rs]):.3f} | {_mean([r['dw_effective_rank'] for r in rs]):.1f} "
                f"| {_mean([r['rank_w_90'] for r in rs]):.0f} "
                f"| {_mean([r['dw_in_top_w_90_input'] for r in rs]):.3f} / "
                f"{_mean([r['dw_in_top_w_90_output'] for r in rs]):.3f} | {top_in:.3f} / {top_out:.3f} "
                f"| {_mean([max(r['spectral_drift']) for r in rs]):.3g} "
                f"| {_mean([max(r['principal_angles_input']) for r in rs]):.2f} / "
                f"{_mean([max(r['principal_angles_output']) for r in rs]):.2f} |")

    kinds: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        kinds[r["module"]].append(r)
    lines += ["## Mean per module kind", "", head.format("module"), sep]
    lines += [row(f"{kind} ({len(rs)})", rs) for kind, rs in sorted(kinds.items())]
    lines += ["", "## Per matrix", "", head.format("matrix"), sep]
    lines += [row(r["name"], [r]) for r in records]
    return "\n".join(lines) + "\n"


def _grid(records: list[dict[str, Any]], module: str, key: str) -> tuple[np.ndarray, list[int]]:
    """[layers, 11] decile shares (+ rest) of one module kind, rows in layer order."""
    rs = sorted((r for r in records if r["module"] == module and r["layer"] is not None), key=lambda r: r["layer"])
    rows = [list(r[key]) + [r.get(f"{key}_rest", 0.0)] for r in rs]
    return np.asarray(rows, np.float64).reshape(len(rs), -1), [r["layer"] for r in rs]


def plot(records: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """PNG plots: decile-share heat maps per layer (input, output and w0's own), drift and ΔK effective
    rank by layer. Needs matplotlib."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = sorted({r["module"] for r in records if r["layer"] is not None})
    written = []
    titles = {"bins_input": "share of ‖ΔK‖² on w0's input-side singular deciles",
              "bins_output": "share of ‖ΔK‖² on w0's output-side singular deciles",
              "bins_w": "share of ‖W0‖² per singular decile"}
    for key, title in titles.items():
        if not modules:
            break
        cols = min(len(modules), 4)
        rows = -(-len(modules) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows + 0.6), squeeze=False)
        for ax in axes.flat[len(modules):]:
            ax.axis("off")
        for ax, module in zip(axes.flat, modules):
            grid, layers = _grid(records, module, key)
            if key == "bins_w":
                grid = grid[:, :-1]
            image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(grid.max()), 1e-12),
                              origin="lower", interpolation="nearest")
            ax.set_title(module, fontsize=9)
            ax.set_xticks(range(grid.shape[1]))
            ax.set_xticklabels([str(d) for d in range(10)] + (["rest"] if grid.shape[1] > 10 else []), fontsize=7)
            ax.set_yticks(range(len(layers)))
            ax.set_yticklabels([str(layer) for layer in layers], fontsize=6)
            ax.set_xlabel("decile (0 = top singular values)", fontsize=7)
            ax.set_ylabel("layer", fontsize=7)
            fig.colorbar(image, ax=ax, fraction=0.046)
        fig.suptitle(title)
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    lines = {"drift_by_layer": ("mean spectral drift, top k", lambda r: float(np.mean(r["spectral_drift"]))),
             "effective_rank_by_layer": ("effective rank of ΔK", lambda r: r["dw_effective_rank"]),
             "rel_norm_by_layer": ("‖ΔK‖ / ‖W0‖", lambda r: r["dw_rel_norm"])}
    for name, (label, value) in lines.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for module in modules:
            rs = sorted((r for r in records if r["module"] == module and r["layer"] is not None),
                        key=lambda r: r["layer"])
            ax.plot([r["layer"] for r in rs], [value(r) for r in rs], marker="o", markersize=3, label=module)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        if modules:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(records: list[dict[str, Any]], out_dir: str | Path, meta: dict[str, Any] | None = None,
                 plots: bool = True) -> list[Path]:
    """Per-layer JSON, spectral.json, summary.md and (with `plots`) the PNGs; returns the files written."""
    out_dir = Path(out_dir)
    written = write_json(records, out_dir, meta)
    summary = out_dir / "summary.md"
    summary.write_text(summary_markdown(records, meta))
    written.append(summary)
    if plots:
        written += plot(records, out_dir)
    return written
