"""Per-group posterior summaries accumulated over batches of draws.

Storing every group's draws does not scale (10⁶ groups × 4000 draws is 32 GB
in float64), so group summaries are running sums over batches of draws: the
mean, second moment and P(effect > 0) use every draw (Rao-Blackwellised where
the method supplies conditional moments), and interval end points come from a
retained, evenly thinned subset of draws whose size is bounded by a memory
budget (all draws when they fit). ``quantile_draws`` records how many were used.
The retained draws are joint (one row = one posterior draw of every group),
so decisions and transport can use them; they are saved as ``draws.npz``.
"""
from __future__ import annotations

from statistics import NormalDist
from typing import NamedTuple

import numpy as np

QUANTILE_BUDGET_BYTES = 256 * 2**20
# Sample quantiles only where each tail's end point lies at or beyond the second order statistic.
MIN_TAIL_RANK = 2


class GroupSummary(NamedTuple):
    mean: np.ndarray           # (nodes,) float64
    sd: np.ndarray             # (nodes,) float64
    lower: np.ndarray          # (nodes,) float64
    upper: np.ndarray          # (nodes,) float64
    prob_positive: np.ndarray  # (nodes,) float64
    quantile_draws: int
    draws: np.ndarray          # (kept, nodes) float32  the retained joint draws (every stride-th)
    draw_index: np.ndarray     # (kept,) int64 their positions in the flattened (chain, draw) axis

    def first(self, nodes: int) -> "GroupSummary":
        """The summaries of the first ``nodes`` nodes (padding nodes dropped)."""
        return self._replace(mean=self.mean[:nodes], sd=self.sd[:nodes], lower=self.lower[:nodes],
                             upper=self.upper[:nodes], prob_positive=self.prob_positive[:nodes],
                             draws=self.draws[:, :nodes])


def interval_bounds(kept: np.ndarray, mean: np.ndarray, sd: np.ndarray, interval: float):
    """Equal-tailed interval end points per node from ``kept`` (draws, nodes).

    Sample quantiles of few draws cover too little: the expected coverage of the order
    statistics ``X(a), X(b)`` of ``n`` draws is ``(b − a)/(n + 1)``, so NumPy's default
    (``a = 1 + 0.05 (n − 1)``) gave 0.847 for a 90% interval from 33 kept draws — which
    is what 10⁶ groups measured. The Weibull plotting position ``p (n + 1)`` makes the
    expected coverage exact at the order statistics; between the first two, in the tail,
    linear interpolation over-covers (0.909 for 90% from 33 draws), so it needs
    ``(n + 1)(1 − interval)/2 ≥ 2`` (39 draws for 90%). With fewer kept draws (10⁷ groups
    keep three), the interval is mean ± z·sd from the moments, which use every draw.
    """
    n = kept.shape[0]
    tail = (1 - interval) / 2
    if (n + 1) * tail >= MIN_TAIL_RANK:
        lower, upper = np.quantile(kept, [tail, 1 - tail], axis=0, method="weibull")
        return lower, upper
    z = NormalDist().inv_cdf(1 - tail)
    return mean - z * sd, mean + z * sd


def interval_rule(kept_draws: int, interval: float) -> str:
    """How ``interval_bounds`` forms group intervals for this many kept draws (provenance)."""
    if (kept_draws + 1) * (1 - interval) / 2 >= MIN_TAIL_RANK:
        return f"quantiles (Weibull plotting position) of {kept_draws} retained joint draws"
    return f"mean ± z·sd from moments over every draw ({kept_draws} retained draws are too few for quantiles)"


def retained_stride(total_draws: int, total_nodes: int) -> int:
    """Keep every k-th draw for quantiles so that the kept draws fit the budget."""
    fits = max(QUANTILE_BUDGET_BYTES // (8 * max(total_nodes, 1)), 1)
    return max(1, -(-total_draws // fits))


class Accumulator:
    """Running sums for one level's nodes; feed it batches of (draws, nodes)."""

    def __init__(self, nodes: int, stride: int):
        self.count = 0
        self.sum = np.zeros(nodes)
        self.sum_sq = np.zeros(nodes)
        self.sum_pos = np.zeros(nodes)
        self.stride = stride
        self.kept: list[np.ndarray] = []
        self._offset = 0

    def add(self, draws: np.ndarray) -> None:
        """Plain sums over draws (B, nodes)."""
        draws = np.asarray(draws, dtype=np.float64)
        self.add_sums(draws, draws.sum(axis=0), (draws**2).sum(axis=0), (draws > 0).sum(axis=0))

    def add_sums(self, draws: np.ndarray, sum_, sum_sq, sum_pos) -> None:
        """Sums computed elsewhere (on a device, Rao-Blackwellised: Σ E[τ|·], Σ E[τ²|·],
        Σ P(τ>0|·)) plus the batch's draws (B, nodes) for the retained quantile subset."""
        self.sum += np.asarray(sum_, dtype=np.float64)
        self.sum_sq += np.asarray(sum_sq, dtype=np.float64)
        self.sum_pos += np.asarray(sum_pos, dtype=np.float64)
        batch = draws.shape[0]
        first = (-self._offset) % self.stride
        if first < batch:
            self.kept.append(np.asarray(draws[first::self.stride], dtype=np.float64))
        self.count += batch
        self._offset += batch

    def finish(self, interval: float) -> GroupSummary:
        mean = self.sum / self.count
        var = np.maximum(self.sum_sq / self.count - mean**2, 0.0) * self.count / max(self.count - 1, 1)
        kept = np.concatenate(self.kept, axis=0)
        lower, upper = interval_bounds(kept, mean, np.sqrt(var), interval)
        index = np.arange(0, self.count, self.stride)[: kept.shape[0]]
        return GroupSummary(mean, np.sqrt(var), lower, upper, self.sum_pos / self.count, kept.shape[0],
                            kept.astype(np.float32), index)


def summarise_draws(draws: np.ndarray, interval: float) -> GroupSummary:
    """Summary of in-memory draws (chains, draws, nodes)."""
    flat = draws.reshape(-1, draws.shape[-1])
    acc = Accumulator(flat.shape[1], 1)
    acc.add(flat)
    return acc.finish(interval)
