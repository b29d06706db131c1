"""Figures of the toy studies: axis labels with units, PNG + PDF, floor bands, smoke-run titles.

* ``label(key)`` turns a metric key into an axis label with its unit or definition
  (``"w2_p0"`` -> ``"W2 to p_0 (data units)"``); unknown keys are an error, so no raw key reaches a figure.
* ``save(fig, path)`` writes ``<path>.png`` and ``<path>.pdf`` (tight layout) and closes the figure.
* ``floor_band(ax, floor)`` draws a finite-sample floor (``{"mean", "sd", "values"}`` over >= 10 draws)
  as a horizontal band: mean and the 2.5-97.5% range of the draws.
* ``title(text, quick)`` prefixes smoke runs with ``SMOKE_LABEL``.
* ``METHOD_NAMES`` / ``METHOD_COLORS``, ``SOLVER_NAMES`` / ``SOLVER_STYLES``: one look across studies.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["LABELS", "label", "short_label", "save", "floor_band", "title", "SMOKE_LABEL", "METHOD_NAMES",
           "METHOD_COLORS", "SOLVER_NAMES", "SOLVER_STYLES", "new_figure", "tidy_log_axes", "method_name",
           "solver_name", "unit", "label_axes", "legend_outside"]

SMOKE_LABEL = "SMOKE RUN (--quick): not evidence"

#: metric keys without a suffix; "_p0" / "_teacher" suffixes add "to p_0" / "to the teacher's samples"
_BASE = {
    "w2": ("W2", "data units"),
    "sliced_w2": ("sliced W2", "data units"),
    "mmd2": ("MMD²", "multi-scale RBF kernel"),
    "precision": ("precision", "fraction of samples in a reference k-NN ball"),
    "recall": ("recall", "fraction of reference in a sample k-NN ball"),
    "density": ("density", "k-NN ball count / k"),
    "coverage": ("coverage", "fraction of reference covered"),
    "mode_precision": ("mode precision", "fraction of samples in their mode's 3σ-mass ball"),
    "modes_covered": ("modes covered", "fraction of modes"),
    "mode_tv": ("mode TV", "total variation of mode frequencies"),
    "nll": ("NLL under p_0", "nats"),
    "variance_ratio": ("total variance ratio", "tr C_samples / tr C_ref; 1 = no shrinkage"),
}
_SUFFIX = {"p0": "to p_0", "teacher": "to the teacher's samples"}

LABELS: dict[str, str] = {
    "E": "E: MSE to the teacher solver's endpoint (data units²)",
    "E_solver": "E: MSE to the teacher solver's endpoint (data units²)",
    "E_exact": "MSE to the exact ODE endpoint (data units²)",
    "E_teacher_ode": "MSE to the teacher's exact ODE endpoint (data units²)",
    "E_true_ode": "MSE to the true ODE endpoint (data units²)",
    "E_decoded": "E after decoding: MSE to the decoded solver endpoint (decoded units²)",
    "fd": "Fréchet distance of decoded samples to decoded data (decoded units²)",
    "w2_latent": "W2 to data in latent space (latent units)",
    "final_loss": "final training loss (data units²)",
    "score_error": "teacher score error (eps MSE per coordinate)",
    "mech_correlation": "corr(teacher's error, student's own error)",
    "mech_correction": "fraction of the teacher's error the student undoes",
    "mech_cosine": "mean cosine(teacher's error, student's own error)",
    "train_steps": "training steps (optimizer steps)",
    # the exact-teacher studies (studies.cells): the reference is p_0, the exact teacher's distribution
    "w2": "W2 to p_0 = the exact teacher's samples (data units)",
    "mmd2": "MMD² to p_0 (multi-scale RBF kernel)",
    "variance_ratio": "total variance ratio to p_0 (tr C_samples / tr C_p0; 1 = no shrinkage)",
    "grid_size": "N (grid intervals)",
}

METHOD_NAMES = {"cd": "CD", "direct_cd": "Direct CD", "cd_ema": "CD (EMA target)"}
METHOD_COLORS = {"cd": "tab:blue", "direct_cd": "tab:red", "cd_ema": "tab:cyan"}
SOLVER_NAMES = {"ddim": "DDIM", "euler": "Euler (EDM)", "heun": "Heun (EDM)", "euler_vp": "Euler (paper)",
                "heun_vp": "Heun (paper)"}
SOLVER_STYLES = {"ddim": "-", "euler": "-.", "heun": ":", "euler_vp": "--", "heun_vp": (0, (1, 1))}


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def solver_name(solver: str) -> str:
    """``"ddim"`` -> ``"DDIM"``; merged rows (``"ddim=euler"``) name every member."""
    return " = ".join(SOLVER_NAMES.get(s, s) for s in str(solver).split("="))


def label(key: str) -> str:
    """Axis label of a metric key, with its unit or definition (``KeyError`` for an unknown key)."""
    if key in LABELS:
        return LABELS[key]
    base, _, suffix = key.rpartition("_")
    if base in _BASE and suffix in _SUFFIX:
        name, unit = _BASE[base]
        return f"{name} {_SUFFIX[suffix]} ({unit})"
    if key in _BASE:
        name, unit = _BASE[key]
        return f"{name} ({unit})"
    raise KeyError(f"no axis label for metric {key!r}; add it to studies.plotting.LABELS")


def short_label(key: str) -> str:
    """The label without its parenthesised unit (for panel titles)."""
    return label(key).split(" (")[0]


def unit(key: str) -> str:
    """The parenthesised unit or definition of a label (for y axes under a ``short_label`` title)."""
    text = label(key)
    return text[text.index(" (") + 2:-1] if " (" in text else text


def label_axes(ax, key: str, fontsize: int = 7) -> None:
    """Panel title = the metric's name, y label = its unit or definition."""
    ax.set_title(short_label(key), fontsize=fontsize + 1)
    ax.set_ylabel(unit(key), fontsize=fontsize - 1)


def title(text: str, quick: bool) -> str:
    return f"{SMOKE_LABEL} — {text}" if quick else text


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (3.2, 3.0), **kw):
    """``(fig, axes)`` with the Agg backend; ``axes`` always a 2D array."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False, **kw)
    return fig, axes


def save(fig, path: str | Path, dpi: int = 110, rect: tuple[float, float, float, float] | None = None) -> list[Path]:
    """Tight layout (inside ``rect``), then ``<stem>.png`` and ``<stem>.pdf`` beside each other; closes the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    stem = path.with_suffix("")
    fig.tight_layout(rect=rect)
    out = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(out[0], dpi=dpi)
    fig.savefig(out[1])
    plt.close(fig)
    return out


FLOOR_TEXT = "finite-sample floor (10+ draws: mean, 95% range)"


def floor_band(ax, floor: Mapping[str, Any] | None, orientation: str = "horizontal", color: str = "0.6",
               text: str = FLOOR_TEXT, span: tuple[float, float] | None = None) -> None:
    """The floor distribution ``{"mean", "values"}`` as a band (2.5-97.5% of the draws) with its mean;
    ``span``: only over this x range (a floor per column), else across the axes."""
    if not floor or floor.get("mean") is None:
        return
    vals = np.asarray([v for v in floor.get("values", []) if v is not None], dtype=float)
    lo, hi = (np.quantile(vals, 0.025), np.quantile(vals, 0.975)) if vals.size >= 2 else (floor["mean"],) * 2
    labels = {lab for lab in ax.get_legend_handles_labels()[1]}
    label = None if text in labels else text
    if span is not None:
        ax.fill_between(list(span), lo, hi, color=color, alpha=0.3, lw=0, label=label)
        ax.plot(list(span), [floor["mean"]] * 2, color=color, lw=0.8, ls=":")
    elif orientation == "horizontal":
        ax.axhspan(lo, hi, color=color, alpha=0.3, lw=0, label=label)
        ax.axhline(floor["mean"], color=color, lw=0.8, ls=":")
    else:
        ax.axvspan(lo, hi, color=color, alpha=0.3, lw=0, label=label)
        ax.axvline(floor["mean"], color=color, lw=0.8, ls=":")


def tidy_log_axes(ax) -> None:
    """No minor tick labels on log axes (they overlap when a panel spans less than a decade)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
        if scale == "log":
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0)))
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(NullFormatter())


def legend_outside(fig, axes: Sequence, ncol: int = 4, fontsize: int = 7) -> None:
    """One legend for the figure with every distinct line drawn on any panel."""
    seen: dict[str, Any] = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=min(ncol, len(seen)),
                   fontsize=fontsize, frameon=False)
