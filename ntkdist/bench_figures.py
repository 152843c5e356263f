"""The figures of a bench report (matplotlib, headless): ``scaling.png`` (strong and weak
scaling of the recompute pass) and ``throughput.png`` (each worker's rates against its
floors, and the store against dd)."""

from __future__ import annotations

import os

from .figures import _pyplot, _save


def draw(report: dict, out: str) -> list[str]:
    """Draw the report's figures into ``out``; their paths."""
    plt = _pyplot()
    return [scaling(plt, report, os.path.join(out, "scaling.png")),
            throughput(plt, report, os.path.join(out, "throughput.png"))]


def scaling(plt, report: dict, path: str) -> str:
    """Left: strong scaling's speed-up against the ideal k. Right: both efficiencies."""
    sc = report["scaling"]
    strong, weak = sc["strong"], sc["weak"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.2, 3.6))
    ks = [r["workers"] for r in strong]
    left.plot(ks, ks, color="0.6", ls="--", label="ideal")
    left.plot(ks, [r["speedup"] for r in strong], "o-", label=f"N = {strong[0]['n']}")
    left.set_xlabel("workers k")
    left.set_ylabel("speed-up T₁ / T_k")
    left.set_title("strong scaling", fontsize=9)
    left.legend(fontsize=8)
    right.axhline(1.0, color="0.6", ls="--")
    right.plot(ks, [r["efficiency"] for r in strong], "o-", label="strong: T₁ / (k·T_k)")
    right.plot([r["workers"] for r in weak], [r["efficiency"] for r in weak], "s-",
               label=f"weak: T₁ / T_k, N = {weak[0]['n']}·√k")
    right.set_xlabel("workers k")
    right.set_ylabel("efficiency")
    right.set_ylim(0, max(1.2, *(r["efficiency"] * 1.1 for r in strong + weak)))
    right.set_title("efficiency", fontsize=9)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xticks(ks)
    c = report["fingerprint"]["cluster"]
    return _save(plt, fig, path, f"one recompute pass (N×{report['sizes']['block']} block, "
                                 f"tile {sc['tile']}) on {c['workers']} {c['device']} worker(s)")


def throughput(plt, report: dict, path: str) -> str:
    """Per worker: tile entries/s and the arccos floor; thin and square GEMM GFLOP/s. And
    the store's write and read rates beside dd's."""
    import numpy as np

    w = report["workers"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(12.5, 3.6))
    x = np.arange(len(w))
    labels = [str(i) for i in range(len(w))]
    a.bar(x - 0.2, [r["tile"]["entries_per_s"] / 1e6 for r in w], 0.4, label="tile function")
    a.bar(x + 0.2, [(r["arccos_floor_entries_per_s"] or 0) / 1e6 for r in w], 0.4,
          label="arccos floor")
    a.set_title("kernel tile (M entries/s)", fontsize=9)
    width = 0.2
    for k, (key, dt) in enumerate([("thin", "float64"), ("peak", "float64"),
                                   ("thin", "float32"), ("peak", "float32")]):
        b.bar(x + (k - 1.5) * width, [r[key][dt]["gflops"] for r in w], width,
              label=f"{'thin' if key == 'thin' else 'square'} {dt}")
    b.set_title("GEMM (GFLOP/s)", fontsize=9)
    for ax in (a, b):
        ax.set_xticks(x, labels)
        ax.set_xlabel("worker")
        ax.legend(fontsize=7)
    st, dd = report["store"], report["store"]["dd"]
    rates = [st["write"]["gb_per_s"], (dd.get("write") or {}).get("gb_per_s") or 0,
             st["read"]["gb_per_s"], (dd.get("read") or {}).get("gb_per_s") or 0]
    c.bar(range(4), rates, color=["C0", "C1", "C0", "C1"])
    c.set_xticks(range(4), ["write\nntkdist", "write\ndd", "read\nntkdist", "read\ndd"])
    c.set_title("store (GB/s)", fontsize=9)
    return _save(plt, fig, path, f"per-worker rates ({report['fingerprint']['cpu']})")
