"""Hierarchies over cells, never over rows."""
from __future__ import annotations

from engine.priors import Prior


def to_numpyro(prior: Prior):
    """The NumPyro distribution for a parsed prior."""
    import numpyro.distributions as dist

    a = prior.args
    return {
        "normal": lambda: dist.Normal(a[0], a[1]),
        "halfnormal": lambda: dist.HalfNormal(a[0]),
        "halfcauchy": lambda: dist.HalfCauchy(a[0]),
        "student_t": lambda: dist.StudentT(a[0], a[1], a[2]),
        "exponential": lambda: dist.Exponential(a[0]),
        # 2×2 LKJ: the correlation ρ has (ρ + 1)/2 ~ Beta(η, η).
        "lkj": lambda: dist.TransformedDistribution(dist.Beta(a[0], a[0]),
                                                    dist.transforms.AffineTransform(-1.0, 2.0)),
    }[prior.family]()
