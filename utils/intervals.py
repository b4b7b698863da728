"""95 % intervals for the evaluation's figures: Wilson score intervals for proportions (accuracy, rates)
and seeded percentile bootstraps for statistics without a closed form (weighted F1, the MIA AUC).

Every function returns (lo, hi) as fractions on the statistic's own scale, or None where there is
nothing to resample (no rows): None rather than NaN so that results.json stays valid JSON.
Bootstraps are deterministic for a given seed and draw their resamples in fixed-size chunks, so
memory stays bounded for large splits (about 2 M indices at a time).
"""
import math

import numpy as np

Z95 = 1.959964  # the standard normal's 97.5 % quantile: two-sided 95 %
_CHUNK_CELLS = 2_000_000  # resampled indices held at once


def wilson(k, n, z=Z95):
    """Wilson score interval of a proportion k / n: (lo, hi) as fractions in [0, 1].

    centre = (p + z²/2n) / (1 + z²/n),  half = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n),  p = k/n.
    n = 0 returns None (no rows, no interval). Unlike the normal approximation it stays inside [0, 1]
    and is not empty at k = 0 or k = n.
    """
    k, n = float(k), int(n)
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k = {k} outside [0, n = {n}]")
    p, z2 = k / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _percentile(stats, level):
    stats = np.asarray(stats, dtype=float)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return None
    a = (1 - level) / 2
    lo, hi = np.quantile(stats, [a, 1 - a])
    return (float(lo), float(hi))


def _index_chunks(rng, n, n_boot):
    """(chunk, n) arrays of row indices drawn with replacement, n_boot rows in all."""
    step = max(1, _CHUNK_CELLS // max(n, 1))
    for start in range(0, n_boot, step):
        yield rng.integers(0, n, size=(min(step, n_boot - start), n), dtype=np.int32)


def bootstrap_ci(stat_fn, *arrays, n_boot=1000, seed=0, level=0.95, vectorised=False):
    """Percentile bootstrap interval of `stat_fn(*arrays)`, resampling rows jointly across the arrays.

    Each resample draws len(arrays[0]) row indices with replacement (numpy's default_rng(seed)) and
    applies them to every array, so paired columns (true and predicted labels) stay paired.
    `vectorised=True`: stat_fn receives the arrays resampled as (B, n, ...) batches and returns B
    statistics at once (much faster); otherwise it is called once per resample. Both ways draw the
    same indices, so they give the same interval. Returns (lo, hi) or None for zero rows.
    """
    arrays = [np.asarray(a) for a in arrays]
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"bootstrap_ci: arrays of different lengths {[len(a) for a in arrays]}")
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    stats = []
    for idx in _index_chunks(rng, n, n_boot):
        if vectorised:
            stats.append(np.asarray(stat_fn(*(a[idx] for a in arrays)), dtype=float).reshape(-1))
        else:
            stats.append(np.array([stat_fn(*(a[i] for a in arrays)) for i in idx], dtype=float))
    return _percentile(np.concatenate(stats), level)


def confusion_codes(y_true, y_pred):
    """Each row as one small integer, true class i and predicted class j (the true classes, then
    'another answer' = C): i·(C+1) + j. Returns (codes, C). Enough for any confusion-matrix statistic."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.unique(y_true)
    C = len(classes)
    if C == 0:
        return np.zeros(0, dtype=np.int32), 0
    ti = np.searchsorted(classes, y_true)
    pj = np.searchsorted(classes, y_pred).clip(0, C - 1)
    pj = np.where(classes[pj] == y_pred, pj, C)
    return (ti * (C + 1) + pj).astype(np.int32), C


def weighted_f1_from_codes(codes, C):
    """Weighted F1 (sklearn's average='weighted', zero_division=0) of each row of a (B, n) batch of
    confusion codes: F1_c = 2TP / (2TP + FP + FN) per true class c, weighted by c's support in that
    row (a class absent from a resample weighs 0, as in sklearn)."""
    codes = np.atleast_2d(codes)
    B, n = codes.shape
    cells = C * (C + 1)
    counts = np.bincount((codes + (np.arange(B) * cells)[:, None]).ravel(), minlength=B * cells)
    cm = counts.reshape(B, C, C + 1).astype(float)  # [b, true, predicted (+ other)]
    tp = np.diagonal(cm[:, :, :C], axis1=1, axis2=2)
    support = cm.sum(2)
    predicted = cm[:, :, :C].sum(1)
    denom = support + predicted  # 2TP + FN + FP
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return (f1 * support).sum(1) / n


def weighted_f1(y_true, y_pred):
    """Weighted F1 of one pair of label arrays (the same figure as sklearn's f1_score, average='weighted')."""
    codes, C = confusion_codes(y_true, y_pred)
    return float(weighted_f1_from_codes(codes, C)[0]) if len(codes) else float("nan")


def f1_ci(y_true, y_pred, n_boot=1000, seed=0, level=0.95):
    """Bootstrap interval of the weighted F1 of paired labels (rows resampled jointly). Each row is
    reduced to its confusion-matrix cell first, so a resample costs one gather and one bincount."""
    codes, C = confusion_codes(y_true, y_pred)
    return bootstrap_ci(lambda c: weighted_f1_from_codes(c, C), codes, n_boot=n_boot, seed=seed, level=level,
                        vectorised=True)


def auc_batch(member_counts, nonmember_counts):
    """AUC (members scored higher; ties count one half) of weighted samples on a shared sorted grid.

    member_counts, nonmember_counts: (B, u) weights of the u distinct scores, ascending. For each row,
    AUC = Σ_v Wm(v) · (Wn(< v) + ½ Wn(= v)) / (ΣWm · ΣWn).
    """
    below = np.cumsum(nonmember_counts, 1) - nonmember_counts
    pairs = (member_counts * (below + 0.5 * nonmember_counts)).sum(1)
    return pairs / (member_counts.sum(1) * nonmember_counts.sum(1))


def auc_ci(member_scores, nonmember_scores, n_boot=1000, seed=0, level=0.95):
    """Two-group percentile bootstrap of the ROC AUC of members against non-members.

    Members and non-members are resampled separately (each keeps its size), as they are two
    independent samples; the AUC of each resample is computed from the distinct scores' counts,
    O(n_boot · (m + k)) with no pairwise matrix. Returns (lo, hi) or None when a group is empty.
    """
    m_scores, n_scores = np.asarray(member_scores, dtype=float), np.asarray(nonmember_scores, dtype=float)
    m, k = len(m_scores), len(n_scores)
    if m == 0 or k == 0:
        return None
    grid, codes = np.unique(np.r_[m_scores, n_scores], return_inverse=True)
    u = len(grid)
    m_codes, n_codes = codes[:m], codes[m:]
    rng = np.random.default_rng(seed)
    step = max(1, _CHUNK_CELLS // max(m + k, u))
    stats = []
    for start in range(0, n_boot, step):
        b = min(step, n_boot - start)
        offset = (np.arange(b) * u)[:, None]
        m_draw = m_codes[rng.integers(0, m, size=(b, m), dtype=np.int32)] + offset
        n_draw = n_codes[rng.integers(0, k, size=(b, k), dtype=np.int32)] + offset
        wm = np.bincount(m_draw.ravel(), minlength=b * u).reshape(b, u).astype(float)
        wn = np.bincount(n_draw.ravel(), minlength=b * u).reshape(b, u).astype(float)
        stats.append(auc_batch(wm, wn))
    return _percentile(np.concatenate(stats), level)
