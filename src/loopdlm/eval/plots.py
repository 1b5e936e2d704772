"""Figures for the evaluation reports (optional extra: matplotlib, `pip install loopdlm[plot]`).

Each function writes one PNG and returns its path; without matplotlib they raise UserError with the install hint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from loopdlm.errors import UserError
from loopdlm.eval.attention import AttentionRecord

#: label -> (x values, y values, optional y spread drawn as a band of +- spread)
Series = Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install matplotlib (or loopdlm[plot])") from None
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_lines(series: Series, path: str | Path, xlabel: str, ylabel: str, title: str = "",
               logx: bool = False, hline: tuple[float, str] | None = None) -> Path:
    """One axis with a line (and optional +- spread band) per series; `hline` = (y, label) adds a reference."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (xs, ys, spread) in series.items():
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if spread is not None:
            low = [y - s for y, s in zip(ys, spread)]
            high = [y + s for y, s in zip(ys, spread)]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle="--", linewidth=1, label=hline[1])
    if logx:
        ax.set_xscale("log")
        ticks = sorted({x for xs, _, _ in series.values() for x in xs})
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_attention(records: Sequence[AttentionRecord], path: str | Path, title: str = "") -> Path:
    """Masked-query attention on masked keys, one line per noise level t.

    Left: every layer application by depth (core applications marked). Then one panel per core layer with the loop
    index k on the x axis; dashed lines give the masked-key share (what uniform attention would put on masked keys).
    """
    if not records:
        raise UserError("no attention records to plot")
    plt = _pyplot()
    times = sorted({r.t for r in records})
    core_layers = sorted({r.layer for r in records if r.loop > 0})
    fig, axes = plt.subplots(1, 1 + len(core_layers), figsize=(5.2 * (1 + len(core_layers)), 4.0), squeeze=False)
    colours = plt.get_cmap("viridis")
    for i, t in enumerate(times):
        colour = colours(i / max(len(times) - 1, 1))
        rows = sorted((r for r in records if r.t == t), key=lambda r: r.depth)
        ax = axes[0][0]
        ax.plot([r.depth for r in rows], [r.masked_mass for r in rows], marker="o", markersize=3, color=colour,
                label=f"t={t:g}")
        ax.axhline(rows[0].masked_key_fraction, color=colour, linestyle="--", linewidth=0.8)
        for j, layer in enumerate(core_layers, start=1):
            core = sorted((r for r in rows if r.layer == layer), key=lambda r: r.loop)
            axes[0][j].plot([r.loop for r in core], [r.masked_mass for r in core], marker="o", markersize=3,
                            color=colour, label=f"t={t:g}")
            axes[0][j].axhline(core[0].masked_key_fraction, color=colour, linestyle="--", linewidth=0.8)
    axes[0][0].set_xlabel("layer application (depth)")
    axes[0][0].set_ylabel("attention mass on masked keys\n(mean over masked queries)")
    axes[0][0].set_title("all applications")
    for depth in sorted({r.depth for r in records if r.loop > 0}):
        axes[0][0].axvspan(depth - 0.5, depth + 0.5, color="grey", alpha=0.07, linewidth=0)
    for j, layer in enumerate(core_layers, start=1):
        axes[0][j].set_xlabel("loop k")
        axes[0][j].set_title(f"core layer {layer}")
    from matplotlib.ticker import MaxNLocator

    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
