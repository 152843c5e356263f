"""A study's figures (matplotlib, headless): λ_min/d against N, against depth, and the
measured/predicted ratio against N, from the rows of ``results.csv``."""

from __future__ import annotations

import math
import os


def _short(data: str) -> str:
    """A data source for a title: the generator's name, or the input file's name."""
    return os.path.basename(str(data))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed, on clusters and in CI
    import matplotlib.pyplot as plt

    return plt


def _harmonic_dims(d: int, n_min: float, n_max: float) -> list[tuple[int, int]]:
    """(r, D_r = C(d+r−1, r)) for r = 2 … 8 within [n_min, n_max]·(1/2 … 2): D_2, D_3, D_4
    and, for small d at large N, the higher steps of the staircase."""
    out = []
    for r in range(2, 9):
        D = math.comb(d + r - 1, r)
        if n_min / 2 <= D <= 2 * n_max:
            out.append((r, D))
    return out


def _panels(plt, count: int):
    """A figure of ``count`` panels, three a row; (figure, the panels in use)."""
    count = max(1, count)
    cols = min(3, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _plain_minor_ticks(ax) -> None:
    """No labels on a log axis' minor ticks (they collide over a decade or two)."""
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def _save(plt, fig, path: str, title: str) -> str:
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _by(rows, keys):
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: sort_key(kv[0])))


def sort_key(values: tuple) -> tuple:
    """Numbers in numeric order before other values (d = 8 before d = 12)."""
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in values)


def _mean_by_n(group, value):
    import numpy as np

    by_n = _by(group, ("n",))
    ns = sorted(k[0] for k in by_n)
    vals = [[value(r) for r in by_n[(n,)] if value(r) is not None] for n in ns]
    keep = [(n, v) for n, v in zip(ns, vals) if v]
    return ([n for n, _ in keep], [float(np.mean(v)) for _, v in keep],
            [float(np.min(v)) for _, v in keep], [float(np.max(v)) for _, v in keep])


def lambda_against_n(rows, fits, path: str, title: str = "") -> str:
    """λ_min/d against N (log-log), one panel per (data, d, L, kernel): every seed, the mean
    with the seeds' spread, the bounds and the prediction as lines, vertical lines at D_2,
    D_3, D_4 (and the higher D_r in range), and the fitted exponent in the legend."""
    plt = _pyplot()
    groups = _by([r for r in rows if r["lambda_min"] is not None],
                 ("data", "d", "depth", "kernel"))
    fig, axes = _panels(plt, len(groups))
    for ax, ((data, d, depth, kernel), group) in zip(axes, groups.items()):
        ns, mean, low, high = _mean_by_n(group, lambda r: r["lambda_min"] / r["d"])
        ax.plot([r["n"] for r in group], [r["lambda_min"] / r["d"] for r in group], ".",
                color="0.6", ms=4, label="seeds")
        exponent = next((f for f in fits if f["kind"] == "exponent" and f["d"] == d
                         and f["depth"] == depth and f["kernel"] == kernel
                         and f["data"] == data), None)
        label = "λ_min/d (mean)" if exponent is None else (
            f"λ_min/d, slope {exponent['value']:.3f}")
        ax.errorbar(ns, mean, yerr=[[m - lo for m, lo in zip(mean, low)],
                                    [hi - m for m, hi in zip(mean, high)]],
                    fmt="o-", color="C0", ms=4, capsize=2, label=label)
        for key, style, name in (("upper_bound", "--", "upper min K_ii / d"),
                                 ("lower_bound", ":", "lower (proof chain) / d"),
                                 ("prediction", "-.", "prediction / d")):
            xs, ys, _, _ = _mean_by_n(group, lambda r, k=key: None if r.get(k) in (None, "")
                                      else r[k] / r["d"])
            if xs:
                ax.plot(xs, ys, style, label=name)
        for r, D in _harmonic_dims(d, min(ns), max(ns)):
            ax.axvline(D, color="0.8", lw=0.8)
            ax.text(D, 1.0, f" D_{r}", transform=ax.get_xaxis_transform(), fontsize=7,
                    va="top", color="0.4")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_minor_ticks(ax)
        if max(ns) < 10 * min(ns):  # within a decade: no labelled major tick, so label the N
            ax.set_xticks(ns, [f"{n:g}" for n in ns], fontsize=7)
        ax.set_xlabel("N")
        ax.set_ylabel("λ_min / d")
        ax.set_title(f"{_short(data)}, {kernel}, d = {d}, L = {depth}", fontsize=9)
        ax.legend(fontsize=6)
    return _save(plt, fig, path, title)


def lambda_against_depth(rows, path: str, title: str = "") -> str:
    """λ_min/d against depth, one panel per (data, d, kernel), one line per N (mean over
    seeds)."""
    import numpy as np

    plt = _pyplot()
    groups = _by([r for r in rows if r["lambda_min"] is not None], ("data", "d", "kernel"))
    fig, axes = _panels(plt, len(groups))
    for ax, ((data, d, kernel), group) in zip(axes, groups.items()):
        for (n,), line in _by(group, ("n",)).items():
            by_depth = _by(line, ("depth",))
            depths = sorted(k[0] for k in by_depth)
            ax.plot(depths, [float(np.mean([r["lambda_min"] / r["d"] for r in by_depth[(L,)]]))
                             for L in depths], "o-", ms=4, label=f"N = {n}")
        ax.set_xlabel("depth L")
        ax.set_ylabel("λ_min / d")
        ax.set_title(f"{_short(data)}, {kernel}, d = {d}", fontsize=9)
        ax.legend(fontsize=6)
    return _save(plt, fig, path, title)


def ratio_against_n(rows, path: str, title: str = "") -> str:
    """measured/predicted λ_min against N, one line per (data, d, L, kernel), mean over
    seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for (data, d, depth, kernel), group in _by(rows, ("data", "d", "depth", "kernel")).items():
        ns, mean, _, _ = _mean_by_n(group, lambda r: r.get("measured_over_predicted") or None)
        if ns:
            ax.plot(ns, mean, "o-", ms=4, label=f"{_short(data)} {kernel} d={d} L={depth}")
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_xscale("log")
    _plain_minor_ticks(ax)
    ax.set_xlabel("N")
    ax.set_ylabel("measured / predicted λ_min")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    ax.set_title(title or "measured / predicted", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def study_figures(study, rows, fits) -> list[str]:
    """The figures of a study, in its folder, from its certified rows; the paths: λ_min/d
    against N and depth and the measured/predicted ratio for the limiting kernels' rows,
    λ_min against width for the finite networks' rows."""
    from .study import certified_rows

    out, rows = study.out, certified_rows(rows)
    limits = [r for r in rows if r.get("width") is None]
    finite = [r for r in rows if r.get("width") is not None]
    paths = []
    if limits or not finite:
        paths += [lambda_against_n(limits, fits, os.path.join(out, "lambda_vs_n.png"),
                                   study.name),
                  lambda_against_depth(limits, os.path.join(out, "lambda_vs_depth.png"),
                                       study.name),
                  ratio_against_n(limits, os.path.join(out, "ratio_vs_n.png"), study.name)]
    if finite:
        paths.append(lambda_against_width(finite, os.path.join(out, "lambda_vs_width.png"),
                                          study.name))
    return paths


def lambda_against_width(rows, path: str, title: str = "") -> str:
    """λ_min of a finite network's kernel against its widest hidden layer, log-log, one
    panel per (kernel, layer, data, N, d, L, normalisation): each weight seed as a dot, their
    mean as a line (λ_min = 0, a singular matrix, is left out), the limit's λ_min (where the study ran it) as a dashed line and, for the
    normalised kernels, the theorem's scale d·Π n_l·factor (constant 1) as a dotted one."""
    import numpy as np

    from .bounds import WIDTH_DELTA, width_needed

    plt = _pyplot()
    groups = _by([r for r in rows if r["lambda_min"] is not None and r["lambda_min"] > 0],
                 ("kernel", "layer", "data", "n", "d", "depth", "normalization"))
    fig, axes = _panels(plt, len(groups))
    for ax, (key, group) in zip(axes, groups.items()):
        kernel, layer, data, n, d, depth, norm = key
        by_width = _by(group, ("width",))
        widths = sorted(k[0] for k in by_width)
        for r in group:
            ax.plot(r["width"], r["lambda_min"], ".", color="C0", ms=4, alpha=0.5)
        ax.plot(widths, [float(np.mean([r["lambda_min"] for r in by_width[(w,)]]))
                         for w in widths], "o-", color="C0", ms=4,
                label="finite width (mean over weight seeds)")
        limit = [r["limit_lambda_min"] for r in group if r.get("limit_lambda_min") is not None]
        if limit:
            ax.axhline(float(np.mean(limit)), color="k", ls="--", lw=1,
                       label="infinite-width limit")
        scales = [r.get("theorem_scale") for r in group if r.get("theorem_scale")]
        if scales and norm != "raw":
            ax.axhline(float(np.mean(scales)), color="C3", ls=":", lw=1,
                       label="theorem's scale d·Π n_l (constant 1)")
        need = width_needed(n)
        if widths[0] <= need <= widths[-1] * 4:
            ax.axvline(need, color="0.6", lw=0.8, label=f"N log N log(N/δ), δ = {WIDTH_DELTA}")
        ax.set_xscale("log")
        ax.set_yscale("log")  # near n = N a feature Gram's λ_min falls by decades
        _plain_minor_ticks(ax)
        if max(widths) < 10 * min(widths):  # no labelled major tick: label the widths
            ax.set_xticks(widths, [f"{w:g}" for w in widths], fontsize=7)
        ax.set_xlabel("widest hidden layer n")
        ax.set_ylabel("λ_min" + (" (raw)" if norm == "raw" else f" ({norm} normalisation)"))
        what = "empirical NTK" if kernel == "empirical" else f"layer {layer} features"
        ax.set_title(f"{_short(data)}, {what}, N = {n}, d = {d}, L = {depth}", fontsize=9)
        ax.legend(fontsize=6)
    return _save(plt, fig, path, title)
