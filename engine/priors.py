"""Prior names and the small distribution language of ``--prior NAME=DIST``.

Names (DESIGN.md): ``effect_mean`` (μ_τ), ``effect_scale`` (σ_τ of every
level; ``effect_scale.LEVEL`` for one), ``baseline_mean`` (μ_α),
``baseline_scale`` (σ_α; ``.LEVEL`` likewise), ``noise`` (σ_y), ``slope`` (β).

Distributions: ``normal(m,s)``, ``halfnormal(s)``, ``halfcauchy(s)``,
``student_t(nu,m,s)``, ``exponential(r)``; and ``lkj(eta)`` for ``correlation``
(ρ of baseline and effect within a level, with ``--correlated``; default lkj(2)).
With ``--noise-by-arm`` the noise has one sd per arm, ``noise.control`` and
``noise.treated`` (``noise`` sets both).

Defaults are weakly informative and scaled to the data, with ``s_y`` the
standard deviation of the outcome over all rows and ``m_y`` its mean:

========================  =============================
``baseline_mean``         normal(m_y, 5·s_y)
``effect_mean``           normal(0, 2.5·s_y)
``baseline_scale``        halfnormal(s_y)        (each level)
``effect_scale``          halfnormal(s_y)        (each level)
``noise``                 halfnormal(2·s_y)
``slope``                 normal(0, 2.5·s_y / s_x) (each covariate)
========================  =============================

Example
-------
>>> parse_distribution("normal(0, 5)")
Prior(family='normal', args=(0.0, 5.0))
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

from engine.errors import SpecError

_ARITY = {"normal": 2, "halfnormal": 1, "halfcauchy": 1, "student_t": 3, "exponential": 1, "lkj": 1}
_POSITIVE_ONLY = {"halfnormal", "halfcauchy", "exponential"}
# Which families make sense for which parameter: scales must have positive support.
_SCALE_NAMES = {"effect_scale", "baseline_scale", "noise"}
_LOCATION_NAMES = {"effect_mean", "baseline_mean", "slope"}
# correlation.LEVEL: the baseline–effect correlation ρ of a level, lkj(η): (ρ+1)/2 ~ Beta(η, η),
# the 2×2 case of the LKJ distribution. Present only with correlated effects (--correlated).
_CORRELATION_NAMES = {"correlation"}
PRIOR_NAMES = sorted(_SCALE_NAMES | _LOCATION_NAMES | _CORRELATION_NAMES)

_DIST_RE = re.compile(r"^\s*([a-z_]+)\s*\(([^()]*)\)\s*$")


class Prior(NamedTuple):
    family: str
    args: tuple[float, ...]

    def __str__(self) -> str:
        return f"{self.family}({', '.join(f'{a:g}' for a in self.args)})"


def parse_distribution(text: str, name: str = "prior") -> Prior:
    """Parse ``normal(0,5)`` and friends; raise SpecError naming the problem."""
    match = _DIST_RE.match(text)
    if not match:
        raise SpecError(
            f"prior {name}: cannot read distribution {text!r}; expected FAMILY(ARGS) such as "
            f"normal(0,10) or halfnormal(1), with FAMILY one of {', '.join(sorted(_ARITY))}"
        )
    family, arg_text = match.group(1), match.group(2)
    if family not in _ARITY:
        raise SpecError(
            f"prior {name}: unknown distribution {family!r}; expected one of "
            f"{', '.join(sorted(_ARITY))}"
        )
    try:
        args = tuple(float(a) for a in arg_text.split(",")) if arg_text.strip() else ()
    except ValueError:
        raise SpecError(
            f"prior {name}: arguments of {family} must be numbers, found {arg_text!r}"
        ) from None
    if len(args) != _ARITY[family]:
        raise SpecError(
            f"prior {name}: {family} takes {_ARITY[family]} argument(s), found {len(args)} in {text!r}"
        )
    if not all(math.isfinite(a) for a in args):
        raise SpecError(f"prior {name}: arguments must be finite, found {text!r}")
    scale_args = {"normal": args[1:], "student_t": args[:1] + args[2:]}.get(family, args)
    if any(a <= 0 for a in scale_args):
        raise SpecError(
            f"prior {name}: scale, rate and degrees of freedom must be > 0, found {text!r}"
        )
    return Prior(family, args)


def parse_prior_assignment(text: str, levels: list[str]) -> tuple[str, Prior]:
    """Parse ``NAME=DIST`` (NAME may carry ``.LEVEL``) and check the name."""
    if "=" not in text:
        raise SpecError(f"--prior {text!r}: expected NAME=DIST, e.g. effect_scale=halfnormal(1)")
    name, dist = (part.strip() for part in text.split("=", 1))
    return name, check_prior(name, parse_distribution(dist, name), levels)


def check_prior(name: str, prior: Prior, levels: list[str]) -> Prior:
    base, _, level = name.partition(".")
    if base not in _SCALE_NAMES | _LOCATION_NAMES | _CORRELATION_NAMES:
        raise SpecError(
            f"unknown prior name {name!r}; expected one of {', '.join(PRIOR_NAMES)} "
            f"(scales may name a level: effect_scale.LEVEL)"
        )
    if level and base == "noise" and level in ("control", "treated"):
        level = ""
    if level and base not in {"effect_scale", "baseline_scale", "correlation"}:
        raise SpecError(f"prior {name!r}: only effect_scale, baseline_scale and correlation take a "
                        ".LEVEL suffix (and noise takes .control or .treated with per-arm noise)")
    if level and level not in levels:
        raise SpecError(
            f"prior {name!r}: level {level!r} is not a grouping level; levels are {levels or 'none'}"
        )
    if (base in _CORRELATION_NAMES) != (prior.family == "lkj"):
        raise SpecError(f"prior {name!r}: found {prior}; lkj(eta) is the prior of a correlation, and "
                        "correlation takes only lkj(eta)")
    if base in _SCALE_NAMES and prior.family not in _POSITIVE_ONLY:
        raise SpecError(
            f"prior {name!r} is a scale and needs positive support; found {prior}, expected "
            f"halfnormal, halfcauchy or exponential"
        )
    return prior


def default_priors(outcome_mean: float, outcome_sd: float, levels: list[str],
                   covariate_sds: dict[str, float]) -> dict[str, Prior]:
    """Weakly informative priors scaled to the data (table in the module docstring)."""
    s = outcome_sd if outcome_sd > 0 and math.isfinite(outcome_sd) else 1.0
    priors = {
        "baseline_mean": Prior("normal", (outcome_mean, 5.0 * s)),
        "effect_mean": Prior("normal", (0.0, 2.5 * s)),
        "noise": Prior("halfnormal", (2.0 * s,)),
    }
    for level in levels:
        priors[f"baseline_scale.{level}"] = Prior("halfnormal", (s,))
        priors[f"effect_scale.{level}"] = Prior("halfnormal", (s,))
    for cov, sd in covariate_sds.items():
        sx = sd if sd > 0 and math.isfinite(sd) else 1.0
        priors[f"slope.{cov}"] = Prior("normal", (0.0, 2.5 * s / sx))
    return priors


def structural_priors(defaults: dict[str, Prior], levels, noise_by_arm: bool, correlated: bool) -> dict:
    """Add the parameters that model options switch on: per-arm noise and level correlations."""
    priors = dict(defaults)
    if noise_by_arm:
        shared = priors.pop("noise")
        priors["noise.control"] = priors["noise.treated"] = shared
    if correlated:
        for level in levels:
            priors[f"correlation.{level}"] = Prior("lkj", (2.0,))
    return priors


def resolve_priors(defaults: dict[str, Prior], user: dict[str, Prior], levels: list[str],
                   covariates: list[str]) -> dict[str, Prior]:
    """User priors override defaults; ``effect_scale`` applies to every level."""
    resolved = dict(defaults)
    # Apply level-free names first so that a .LEVEL setting wins over them.
    for name in sorted(user, key=lambda n: "." in n):
        prior = user[name]
        base, _, level = name.partition(".")
        if base in {"effect_scale", "baseline_scale", "correlation"} and not level:
            for lv in levels:
                resolved[f"{base}.{lv}"] = prior
        elif base == "noise" and not level and "noise" not in resolved:
            resolved["noise.control"] = resolved["noise.treated"] = prior
        elif base == "slope" and not level:
            for cov in covariates:
                resolved[f"slope.{cov}"] = prior
        else:
            resolved[name] = prior
    return resolved
