"""What the user asked for: columns, levels, family, priors, method, sampler settings.

A ``Spec`` is checked once, here, for everything that can be checked without
reading data; ``engine.validate`` checks it against the data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from engine.errors import SpecError
from engine.priors import Prior, check_prior, parse_distribution

FAMILIES = ("gaussian", "bernoulli", "binomial", "poisson")
GLM_FAMILIES = ("bernoulli", "binomial", "poisson")
METHODS = ("auto", "exact", "laplace", "nuts", "svi")
# Which methods serve which family (DESIGN.md, "Inference methods").
FAMILY_METHODS = {"gaussian": ("auto", "exact", "nuts"),
                  "bernoulli": ("auto", "laplace", "nuts", "svi"),
                  "binomial": ("auto", "laplace", "nuts", "svi"),
                  "poisson": ("auto", "laplace", "nuts", "svi")}
BACKENDS = ("polars", "dask", "jax")
# GLMs with covariates (the binned route): the reserved key column of a row's covariate bin, and
# the limits on bins per covariate and on bin combinations per (group, arm).
BIN_COLUMN = "covariate_bin"
MAX_COVARIATE_BINS = 1000
MAX_BIN_COMBINATIONS = 100_000
PLANNED_BACKENDS = ()


@dataclass(frozen=True)
class Spec:
    """A complete, checked description of one fit.

    Example
    -------
    >>> Spec(outcome="y", treatment="t", groups=("region",)).method
    'auto'
    """

    outcome: str | None
    treatment: str | None
    groups: tuple[str, ...] = ()
    covariates: tuple[str, ...] = ()
    treated_value: object = None
    family: str = "gaussian"
    method: str = "auto"
    interval: float = 0.9
    priors: dict[str, Prior] = field(default_factory=dict)
    draws: int = 1000
    warmup: int = 1000
    chains: int = 4
    seed: int = 0
    drop_missing: bool = False
    backend: str = "polars"
    scheduler: str | None = None  # dask backend: scheduler address; None starts a LocalCluster
    noise_by_arm: bool = False    # residual sd per arm instead of shared
    correlated: bool = False      # baseline and effect correlated within each level (LKJ prior)
    estimate: str | None = None   # summary-level input: one effect estimate per group ...
    stderr: str | None = None     # ... and its standard error
    design_share: float = 0.5     # share of rows the design assigned to treatment (sample ratio check)
    trials: str | None = None     # binomial: column of trials per row (the outcome counts successes)
    exposure: str | None = None   # poisson: column of exposure per row (rate = count / exposure)
    covariate_bins: int = 16      # GLM with covariates: quantile bins per covariate (cells keyed by bin)
    keep_draws: int | None = None  # joint draws of every group to retain; None: what 256 MiB holds

    def __post_init__(self):
        if self.estimate is not None or self.stderr is not None:
            self._check_summary_level()
        else:
            if not isinstance(self.outcome, str) or not self.outcome:
                raise SpecError("outcome: expected a column name, found " + repr(self.outcome))
            if not isinstance(self.treatment, str) or not self.treatment:
                raise SpecError("treatment: expected a column name, found " + repr(self.treatment))
        columns = [c for c in (self.outcome, self.treatment, self.estimate, self.stderr, self.trials,
                               self.exposure) if c]
        columns += [*self.groups, *self.covariates]
        if BIN_COLUMN in columns and self.family in GLM_FAMILIES and self.covariates:
            raise SpecError(f"column name {BIN_COLUMN!r} is reserved for the covariate bins of a "
                            f"{self.family} model with covariates; rename that column")
        duplicated = sorted({c for c in columns if columns.count(c) > 1})
        if duplicated:
            raise SpecError(
                f"column(s) {duplicated} used in more than one role (outcome, treatment, group, "
                "covariate); each column may play one role"
            )
        if self.family not in FAMILIES:
            raise SpecError(f"family {self.family!r} unknown; expected one of {', '.join(FAMILIES)}")
        if self.method not in METHODS:
            raise SpecError(f"method {self.method!r} unknown; expected one of {', '.join(METHODS)}")
        if self.method not in FAMILY_METHODS[self.family]:
            fix = "laplace (the default), nuts or svi" if self.is_glm else "exact (the default) or nuts"
            raise SpecError(f"method {self.method!r} does not apply to family {self.family!r}; use {fix}")
        self._check_family_columns()
        if self.backend in PLANNED_BACKENDS:
            raise SpecError(f"backend {self.backend!r} is not implemented yet in this version; "
                            f"available: {', '.join(BACKENDS)}")
        if self.backend not in BACKENDS:
            raise SpecError(f"backend {self.backend!r} unknown; expected one of {', '.join(BACKENDS)}")
        if not (isinstance(self.interval, (int, float)) and 0.0 < self.interval < 1.0
                and math.isfinite(self.interval)):
            raise SpecError(
                f"interval {self.interval!r} is outside (0, 1); pass a probability such as 0.9"
            )
        for name, value, low in (("draws", self.draws, 1), ("warmup", self.warmup, 1),
                                 ("chains", self.chains, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise SpecError(f"{name}: expected an integer ≥ {low}, found {value!r}")
        if self.keep_draws is not None and (not isinstance(self.keep_draws, int) or isinstance(self.keep_draws, bool)
                                            or self.keep_draws < 1):
            raise SpecError(f"keep_draws: expected an integer ≥ 1 (joint draws to retain), found {self.keep_draws!r}; "
                            "leave it unset for as many as 256 MiB holds, or pass draws × chains for all")
        if (not isinstance(self.design_share, (int, float)) or isinstance(self.design_share, bool)
                or not math.isfinite(self.design_share) or not 0.0 < self.design_share < 1.0):
            raise SpecError(f"design_share {self.design_share!r} is outside (0, 1); pass the share of rows the "
                            "design assigned to treatment, such as 0.5 (--design-share 0.5)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise SpecError(f"seed: expected a non-negative integer, found {self.seed!r}")
        for name, prior in self.priors.items():
            check_prior(name, prior, list(self.groups))
            if name.split(".")[0] == "correlation" and not self.correlated:
                raise SpecError(f"prior {name!r} needs correlated effects; pass --correlated (correlated=True)")
            if name.partition(".")[2] in ("control", "treated") and not self.noise_by_arm:
                raise SpecError(f"prior {name!r} needs per-arm noise; pass --noise-by-arm (noise_by_arm=True)")
            if self.summary_level and name.split(".")[0] not in ("effect_mean", "effect_scale"):
                raise SpecError(f"prior {name!r} does not apply to summary-level input, whose model has "
                                "only effect_mean and effect_scale; drop it")

    def _check_family_columns(self):
        if self.trials is not None and self.family != "binomial":
            raise SpecError(f"--trials applies to family binomial only (found family {self.family!r}); "
                            "drop it or pass --family binomial")
        if self.family == "binomial" and not self.trials:
            raise SpecError("family binomial needs --trials COL naming the trials per row "
                            "(the outcome column counts successes)")
        if self.exposure is not None and self.family != "poisson":
            raise SpecError(f"--exposure applies to family poisson only (found family {self.family!r}); "
                            "drop it or pass --family poisson")
        if not self.is_glm:
            return
        if self.summary_level:
            raise SpecError(f"summary-level input (--estimate, --stderr) is Gaussian; drop --family {self.family}")
        if self.covariates:
            bins = self.covariate_bins
            if not isinstance(bins, int) or isinstance(bins, bool) or not 2 <= bins <= MAX_COVARIATE_BINS:
                raise SpecError(f"covariate_bins: expected an integer from 2 to {MAX_COVARIATE_BINS}, found "
                                f"{bins!r} (--covariate-bins)")
            if bins ** len(self.covariates) > MAX_BIN_COMBINATIONS:
                raise SpecError(
                    f"{len(self.covariates)} covariates × {bins} bins each make {bins ** len(self.covariates)} "
                    f"bin combinations per group and arm (at most {MAX_BIN_COMBINATIONS}); pass fewer "
                    "--covariate-bins or fewer covariates")
        if self.noise_by_arm:
            raise SpecError(f"--noise-by-arm applies to the Gaussian family only; family {self.family!r} "
                            "has no residual noise")
        for name in self.priors:
            if name.split(".")[0] == "noise":
                raise SpecError(f"prior {name!r} does not apply to family {self.family!r} (no residual "
                                "noise on the link scale); drop it")

    @property
    def is_glm(self) -> bool:
        return self.family in GLM_FAMILIES

    @property
    def weight_column(self) -> str | None:
        """The binomial trials or Poisson exposure column, reduced like a covariate (its cell mean)."""
        return self.trials if self.family == "binomial" else self.exposure if self.family == "poisson" else None

    @property
    def binned(self) -> bool:
        """GLM with covariates: rows are cut into covariate bins, and each bin is a cell of its own
        (``engine.validate.bin_column``), so a cell's rows share one covariate value (its mean)."""
        return self.is_glm and bool(self.covariates)

    @property
    def cell_keys(self) -> tuple[str, ...]:
        """The columns besides the arm that key a cell: the groups, and the bin when binned."""
        return self.groups + ((BIN_COLUMN,) if self.binned else ())

    def check_cells_shareable(self) -> None:
        """Cell tables (``reduce``, ``fit --cells``) exist for every spec but the binned one."""
        if self.binned:
            raise SpecError(
                f"cell tables of family {self.family!r} with --covariate are not supported yet: their cells "
                "are keyed by covariate bins whose edges come from each site's own rows, so two sites' cells "
                "would not merge; fit the rows (causal-engine fit DATA ...) instead")

    @property
    def reduce_covariates(self) -> tuple[str, ...]:
        """The columns whose cell moments the reduction computes: covariates, then the weight column."""
        return self.covariates + ((self.weight_column,) if self.weight_column else ())

    def _check_summary_level(self):
        if not self.estimate or not self.stderr:
            raise SpecError("summary-level input needs both --estimate COL and --stderr COL")
        if self.outcome or self.treatment:
            raise SpecError("pass either rows (--outcome, --treatment) or summary-level input "
                            "(--estimate, --stderr), not both")
        if not self.groups:
            raise SpecError("summary-level input needs --group COL naming what each estimate is for")
        if self.covariates:
            raise SpecError("--covariate does not apply to summary-level input (the estimates are "
                            "already adjusted); drop it")
        if self.noise_by_arm or self.correlated:
            raise SpecError("--noise-by-arm and --correlated do not apply to summary-level input, whose "
                            "model has only the effect; drop them")

    @property
    def summary_level(self) -> bool:
        return self.estimate is not None

    @property
    def levels(self) -> list[str]:
        return list(self.groups)

    def with_priors(self, priors: dict[str, Prior]) -> "Spec":
        return replace(self, priors=priors)


def make_spec(outcome=None, treatment=None, groups=(), covariates=(), priors=None, **options) -> Spec:
    """Build a Spec from API-style arguments; priors may be strings or ``Prior``s."""
    if isinstance(groups, str):
        groups = (groups,)
    if isinstance(covariates, str):
        covariates = (covariates,)
    parsed: dict[str, Prior] = {}
    for name, dist in (priors or {}).items():
        parsed[name] = dist if isinstance(dist, Prior) else parse_distribution(str(dist), name)
    return Spec(outcome=outcome, treatment=treatment, groups=tuple(groups),
                covariates=tuple(covariates), priors=parsed, **options)
