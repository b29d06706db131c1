"""Statistics for findings that survive a second look (DESIGN.md, "Evidence rules").

Pure functions on lists, numpy arrays or torch tensors; results are small dataclasses with ``to_dict()``
for JSON (``studies.common.write_json`` turns the infinities of degenerate intervals into null).

Over seeds (each seed varies every source not under study)
    ``paired_difference(a, b=None, level=0.95) -> PairedDifference``
        mean of ``d_i = a_i - b_i`` with the t-interval and the two-sided p-value (paired by position).
    ``floor_distribution(draw, num_draws=10, seed=0)``
        a metric's finite-sample floor as a distribution: ``draw(seed) -> value | dict`` over >= 10 seeds.
    ``compare_to_floor(values, floor, level=0.95) -> FloorComparison``
        Welch interval for ``mean(values) - floor.mean``.

Over evaluation samples (one trained model; evaluation noise only)
    ``bootstrap_interval(values, statistic=mean, level=0.95, n_resamples=2000, seed=0, method="percentile")``
    ``paired_bootstrap(a, b, ...)``: ``statistic(a) - statistic(b)``, the same samples resampled together.
    ``error_decomposition(student, teacher, true, ...) -> ErrorDecomposition``
        ``student - true = (teacher - true) + (student - teacher)``: correlation, mean cosine, correction.

Across regimes
    ``holm(p)``, ``benjamini_hochberg(p)``, ``bonferroni(p)``, ``adjust_p_values(p, method)``
    ``adjusted_levels(p, alpha, method)``: interval levels that agree with the correction's decisions.
    ``RegimeInput(label, dE, dQ, ...)`` / ``RegimeInput.from_methods(label, E_cd, E_dcd, Q_cd, Q_dcd)``
    ``classify_regimes(regimes, alpha=0.05, method="holm", include_quick=False) -> VerdictSet``
        "paradox" only when dE > 0 and dQ > 0 both hold with corrected paired intervals.

Rows
    ``merge_identical_rows(rows, name_key, match_keys, equivalent, ...) -> MergeResult``
    ``is_quick(item)``, ``split_quick(items)``, ``evidence_rows(rows, include_quick=False)``: smoke runs
    are never evidence unless asked for, and then they are tagged.
"""
from .intervals import (
    BootstrapInterval,
    FloorComparison,
    FloorDistribution,
    PairedDifference,
    as_array,
    bootstrap_interval,
    compare_to_floor,
    floor_distribution,
    floor_seeds,
    paired_bootstrap,
    paired_difference,
)
from .mechanism import ErrorDecomposition, error_decomposition
from .multiple import CORRECTIONS, adjust_p_values, adjusted_levels, benjamini_hochberg, bonferroni, holm
from .rows import (
    QUICK_TAG,
    MergeRecord,
    MergeResult,
    evidence_rows,
    is_quick,
    merge_identical_rows,
    numeric_leaves,
    split_quick,
)
from .verdicts import VERDICTS, RegimeInput, RegimeVerdict, VerdictSet, classify_regimes, verdict_from_directions

__all__ = [
    "PairedDifference", "paired_difference", "BootstrapInterval", "bootstrap_interval", "paired_bootstrap",
    "FloorDistribution", "floor_distribution", "floor_seeds", "FloorComparison", "compare_to_floor", "as_array",
    "ErrorDecomposition", "error_decomposition",
    "CORRECTIONS", "bonferroni", "holm", "benjamini_hochberg", "adjust_p_values", "adjusted_levels",
    "VERDICTS", "RegimeInput", "RegimeVerdict", "VerdictSet", "classify_regimes", "verdict_from_directions",
    "MergeRecord", "MergeResult", "numeric_leaves", "merge_identical_rows",
    "QUICK_TAG", "is_quick", "split_quick", "evidence_rows",
]
