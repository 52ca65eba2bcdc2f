"""Spectral clustering of one word's maps and the suspect regions of its clusters (docs/BIAS.md).

In the spirit of SpRAy (Lapuschkin et al. 2019): spectral clustering of heatmaps with an
eigengap choice of k; a cluster whose mass sits consistently on a window off the word's
objects is a Clever-Hans suspect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffcam.core.bias.settings import BiasSettings
from diffcam.core.bias.windows import EPS, hotspot, window_box, window_cells, window_max, window_sums

__all__ = ["ClusterResult", "cluster_word_maps", "suspect_regions"]


@dataclass(frozen=True)
class ClusterResult:
    """Spectral clustering of one word's maps: ``labels`` per map, ``k`` chosen by the
    largest eigengap of the normalised Laplacian among the first ``k_max`` + 1 eigenvalues."""

    labels: np.ndarray
    k: int
    eigenvalues: tuple[float, ...]
    affinity: np.ndarray


def _affinity(ps: np.ndarray, knn: int) -> np.ndarray:
    """Locally scaled Gaussian affinity (Zelnik-Manor & Perona 2004) on the Hellinger
    distance between mass distributions: A_ij = exp(−d_ij² / (σ_i σ_j)), σ_i = distance
    to the ``knn``-th nearest neighbour (floored to avoid 0 for duplicate maps)."""
    n = len(ps)
    x = np.sqrt(ps.reshape(n, -1)) / math.sqrt(2.0)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    np.fill_diagonal(d2, 0.0)
    d = np.sqrt(d2)
    kk = min(max(1, knn), n - 1)
    sigma = np.sort(d, axis=1)[:, kk]
    sigma = np.maximum(sigma, max(float(np.median(sigma)) * 1e-3, 1e-6))
    a = np.exp(-d2 / (sigma[:, None] * sigma[None, :]))
    np.fill_diagonal(a, 0.0)
    return a


def _smallest_laplacian_eigenvalues(a: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` smallest eigenvalues of L = I − D^-1/2 A D^-1/2, ascending. Dense
    `eigvalsh` up to 300 maps; above, ARPACK on the ``m`` largest of D^-1/2 A D^-1/2
    (λ_L = 1 − μ) — O(n²) per iteration instead of O(n³)."""
    n = len(a)
    deg = a.sum(1)
    dinv = 1.0 / np.sqrt(np.maximum(deg, EPS))
    norm = dinv[:, None] * a * dinv[None, :]
    if n <= 300:
        return np.sort(np.linalg.eigvalsh(np.eye(n) - norm))[:m]
    from scipy.sparse.linalg import eigsh

    mu = eigsh(norm, k=min(m, n - 1), which="LA", v0=np.full(n, 1.0 / math.sqrt(n)), return_eigenvectors=False)
    return np.sort(1.0 - mu)


def cluster_word_maps(maps: Sequence[np.ndarray], settings: BiasSettings = BiasSettings()) -> ClusterResult:
    """Cluster one word's maps (same grid, none zero) by spectral clustering (SpRAy).

    Affinity: `_affinity`. k: 1 + argmax of the gaps λ_{i+1} − λ_i, i = 0..k_max−1, of the
    symmetric normalised Laplacian's smallest eigenvalues (k = 1 when the first gap is the
    largest: one cluster). Labels for k > 1: scikit-learn's SpectralClustering on the
    precomputed affinity with ``assign_labels="cluster_qr"`` (deterministic).

    Scale: with more than ``cluster_max_maps`` maps, the clustering runs on a seeded
    subset of that size (the affinity is dense, n² memory) and every other map joins the
    cluster whose mean map is nearest in Hellinger distance. ``affinity`` is then the
    subset's.
    """
    ps = np.array([np.asarray(m, dtype=np.float64) / float(np.sum(m)) for m in maps])
    n = len(ps)
    if n < 3:
        return ClusterResult(np.zeros(n, dtype=int), 1, (), np.ones((n, n)))
    sub = np.arange(n)
    if n > settings.cluster_max_maps:
        rng = np.random.default_rng(np.random.SeedSequence([settings.cluster_seed, n]))
        sub = np.sort(rng.choice(n, size=settings.cluster_max_maps, replace=False))
    a = _affinity(ps[sub], settings.knn)
    kmax = min(settings.k_max, len(sub) - 1)
    ev = _smallest_laplacian_eigenvalues(a, kmax + 2)
    gaps = np.diff(ev[: kmax + 1])
    k = int(np.argmax(gaps)) + 1 if len(gaps) else 1
    if k == 1:
        labels = np.zeros(n, dtype=int)
    else:
        from sklearn.cluster import SpectralClustering

        lab_sub = SpectralClustering(
            n_clusters=k, affinity="precomputed", assign_labels="cluster_qr", random_state=settings.cluster_seed
        ).fit_predict(a + 1e-12)
        labels = np.full(n, -1)
        labels[sub] = lab_sub
        if len(sub) < n:
            roots = np.sqrt(ps.reshape(n, -1))
            means = np.array([np.sqrt(ps[sub][lab_sub == c].mean(0).ravel()) for c in range(k)])
            rest = np.setdiff1d(np.arange(n), sub)
            d = ((roots[rest][:, None, :] - means[None, :, :]) ** 2).sum(-1)
            labels[rest] = np.argmin(d, axis=1)
        # relabel by size (largest first), ties by first member: stable ids for flag ids
        order = sorted(set(labels.tolist()), key=lambda lab: (-(labels == lab).sum(), int(np.argmax(labels == lab))))
        remap = {old: new for new, old in enumerate(order)}
        labels = np.array([remap[v] for v in labels.tolist()])
    return ClusterResult(labels, k, tuple(float(v) for v in ev[: kmax + 2]), a)


def suspect_regions(
    ps: np.ndarray,
    labels: np.ndarray,
    obj_cov: Sequence[np.ndarray | None],
    settings: BiasSettings = BiasSettings(),
) -> list[dict[str, Any]]:
    """Per cluster: its mean map, and the densest window off the word's objects.

    ``ps``: (n, h, w) mass distributions; ``obj_cov[i]``: object coverage of sample i
    (None: unknown). A window is off-object when, averaged over the cluster's members with
    a known coverage, no cell of it has a mean coverage above ``region_object_overlap_max``;
    a cluster with no known coverage is never suspect (no masks: on- and off-object
    cannot be told apart; its ``reason`` says so). Returns one dict per cluster:
    cluster, size, members (indices), prototype (mean map), and when an off-object
    window exists: box, share (cluster mean mass in it), consistency (share of members
    whose own map has >= ``member_enrichment_min`` × the window's area share of its mass
    there), rest_share (mean share
    there in the word's other clusters, None if none), object_overlap, suspect (bool:
    size, share and consistency all pass their thresholds).
    """
    n, h, w = ps.shape
    grid = (h, w)
    win = window_cells(grid, settings.hotspot_size)
    area = win[0] * win[1] / (h * w)
    known = np.array([c is not None for c in obj_cov], dtype=bool)
    covs = np.array([np.zeros(grid) if c is None else c for c in obj_cov])
    out = []
    for lab in sorted(set(labels.tolist())):
        idx = np.nonzero(labels == lab)[0]
        proto = ps[idx].mean(0)
        rec: dict[str, Any] = {"cluster": int(lab), "size": int(len(idx)), "members": idx.tolist(),
                               "prototype": proto, "suspect": False, "box": None}
        kn = idx[known[idx]]
        if len(kn) == 0:
            rec["reason"] = "no member has object masks: on- and off-object cannot be told apart"
            out.append(rec)
            continue
        overlap = window_max(covs[kn].mean(0), win)
        allowed = overlap <= settings.region_object_overlap_max
        hs = hotspot(proto, win, allowed)
        if hs is not None:
            share, (r, c) = hs
            member_share = np.array([window_sums(ps[i], win)[r, c] for i in idx])
            rest = np.nonzero(labels != lab)[0]
            rest_share = float(np.mean([window_sums(ps[i], win)[r, c] for i in rest])) if len(rest) else None
            consistency = float((member_share >= settings.member_enrichment_min * area).mean())
            big = len(idx) >= settings.min_cluster_size and len(idx) >= settings.min_cluster_frac * n
            rec.update(
                box=window_box(r, c, win, grid), window=[int(r), int(c), int(win[0]), int(win[1])], share=share,
                consistency=consistency, rest_share=rest_share, object_overlap=float(overlap[r, c]),
                member_shares=member_share.tolist(),
                suspect=bool(big and share >= settings.cluster_enrichment_min * area
                             and consistency >= settings.cluster_consistency_min),
            )
        out.append(rec)
    return out
