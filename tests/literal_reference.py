"""Slow, literal re-implementations of docs/METHOD.md §3, written from the text with loops.

Tests compare `diffcam.core.refine` against these on seeded random maps; the benchmark
times them. Nothing here imports diffcam_core: the constants are copied from docs/METHOD.md
so that a wrong default in `RefineSettings` is caught, not mirrored. Reflect padding is
written as an index function; percentiles follow numpy's default 'linear' method (the
one the reference code uses) by hand.
"""

from __future__ import annotations

import math

import numpy as np


def reflect_index(i: int, n: int) -> int:
    """numpy `reflect` padding (edge not repeated): -1 → 1, n → n-2; size 1 → 0."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i = i % period
    return i if i < n else period - i


def percentile(values: list[float], q: float) -> float:
    """numpy 'linear' percentile, including its lerp form for t >= 0.5 (exact agreement)."""
    v = sorted(values)
    pos = (q / 100.0) * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    t = pos - lo
    a, b = v[lo], v[hi]
    if t >= 0.5:
        return b - (b - a) * (1 - t)
    return a + (b - a) * t


def pop_std(values: list[float]) -> float:
    m = sum(values) / len(values)
    return math.sqrt(sum((x - m) ** 2 for x in values) / len(values))


def kernel_size(H: np.ndarray, n_steps: int) -> int:
    """k = nearest odd of 3·f_step·f_std·f_size, clamped to [3, k_max] (tiny grids: see refine)."""
    h, w = H.shape
    side = min(h, w)
    if side < 3:
        return 1
    f_step = min(n_steps / 16, 2.0)
    f_std = min(5 * pop_std([float(x) for x in H.ravel()]), 2.0)
    f_size = min(side / 24, 1.5)
    x = 3 * f_step * f_std * f_size
    best = 1
    for cand in range(1, 1001, 2):  # nearest odd; on a tie the larger one wins
        if abs(cand - x) <= abs(best - x):
            best = cand
    largest_odd = 1
    for cand in range(1, side + 1, 2):
        if cand <= side / 2:
            largest_odd = cand
    k_max = max(min(11, largest_odd), 3)
    return min(max(best, 3), k_max)


def akd(H: np.ndarray, n_steps: int, k: int | None = None) -> np.ndarray:
    """Rank-Gaussian filter, one pixel at a time."""
    h, w = H.shape
    if k is None:
        k = kernel_size(H, n_steps)
    out = np.zeros((h, w))
    if k == 1:
        return H.astype(np.float64).copy()
    p = k // 2
    c = (k * k) // 2
    for i in range(h):
        for j in range(w):
            window = []
            for di in range(-p, p + 1):
                for dj in range(-p, p + 1):
                    window.append(float(H[reflect_index(i + di, h), reflect_index(j + dj, w)]))
            s = sorted(window)
            m = sum(s) / len(s)
            if m <= 0:
                out[i, j] = 0.0
                continue
            sigma = pop_std(s) / m
            if sigma < 1e-8:
                out[i, j] = s[c]
                continue
            wts = [math.exp(-((jj - c) ** 2) / (2 * sigma**2)) for jj in range(k * k)]
            tot = sum(wts)
            out[i, j] = sum(wv / tot * sv for wv, sv in zip(wts, s))
    return out


def gaussian3(H: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """3×3 normalised Gaussian with reflect padding, one pixel at a time."""
    h, w = H.shape
    kern = {(di, dj): math.exp(-(di * di + dj * dj) / (2 * sigma**2)) for di in (-1, 0, 1) for dj in (-1, 0, 1)}
    tot = sum(kern.values())
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            acc = 0.0
            for (di, dj), kv in kern.items():
                acc += kv / tot * float(H[reflect_index(i + di, h), reflect_index(j + dj, w)])
            out[i, j] = acc
    return out


def dacg_percentile(H: np.ndarray) -> float:
    vals = [float(x) for x in H.ravel()]
    mu = sum(vals) / len(vals)
    sd = pop_std(vals)
    if sd > 0.22:
        return 90.0
    if mu > 0.35:
        return 75.0
    if mu < 0.25:
        return 80.0
    return 85.0


def dacg(H: np.ndarray) -> np.ndarray:
    pos = [float(x) for x in H.ravel() if x > 0]
    zeta = percentile(pos, dacg_percentile(H)) if pos else 1e-6
    smooth = gaussian3(H)
    out = np.zeros(H.shape)
    for i in range(H.shape[0]):
        for j in range(H.shape[1]):
            out[i, j] = H[i, j] if H[i, j] > zeta else smooth[i, j]
    return out


def cba_delta(H: np.ndarray) -> float:
    vals = [float(x) for x in H.ravel()]
    nz = [v for v in vals if v > 0]
    p50 = percentile(nz, 50) if nz else 0.0
    mean_nz = sum(nz) / len(nz) if nz else 0.0
    return 0.15 * p50 + 0.15 * percentile(vals, 60) + 0.20 * mean_nz + 0.015 * max(vals)


def cba(H: np.ndarray) -> np.ndarray:
    delta = cba_delta(H)
    out = np.array(H, dtype=np.float64)
    if delta <= 0:
        return out
    for i in range(H.shape[0]):
        for j in range(H.shape[1]):
            v = float(H[i, j])
            if v < delta:
                out[i, j] = v * min(max(v / delta, 0.5), 1.0)
    return out


def heuristic_interference(H: np.ndarray, repeat_share: float) -> np.ndarray:
    vals = [float(x) for x in H.ravel()]
    thr = sum(vals) / len(vals) + 2 * pop_std(vals)
    out = np.zeros(H.shape)
    for i in range(H.shape[0]):
        for j in range(H.shape[1]):
            out[i, j] = 0.05 * repeat_share + (0.02 if H[i, j] > thr else 0.0)
    return out


def sicd(H: np.ndarray, interference: np.ndarray) -> np.ndarray:
    hi = ii = 0.0
    for i in range(H.shape[0]):
        for j in range(H.shape[1]):
            hi += float(H[i, j]) * float(interference[i, j])
            ii += float(interference[i, j]) ** 2
    if ii == 0:
        return np.array(H, dtype=np.float64)
    alpha = min(max(hi / ii, 0.0), 0.5)
    out = np.zeros(H.shape)
    for i in range(H.shape[0]):
        for j in range(H.shape[1]):
            out[i, j] = max(float(H[i, j]) - alpha * float(interference[i, j]), 0.0)
    if (out.max() - out.min()) < 0.9 * (H.max() - H.min()):
        return np.array(H, dtype=np.float64)
    return out


def refine_full(
    H: np.ndarray, n_steps: int, interference: np.ndarray | None = None, repeat_share: float = 0.0
) -> np.ndarray:
    """AKD → DACG → CBA → clip to [0, max raw] and min-max (if not constant) → SICD."""
    raw_max = float(H.max())
    x = cba(dacg(akd(H, n_steps)))
    y = np.zeros(x.shape)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            y[i, j] = min(max(float(x[i, j]), 0.0), raw_max)
    lo, hi = float(y.min()), float(y.max())
    if hi > lo:
        y = (y - lo) / (hi - lo + 1e-8)
    interf = interference if interference is not None else heuristic_interference(y, repeat_share)
    return sicd(y, interf)
