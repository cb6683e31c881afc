"""``fit``: the pipeline, top to bottom — validate → encode → reduce → model → infer → effects → record."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from engine import effects as effects_stage
from engine import provenance, record, validate
from engine.cells import Cells
from engine.encode import Encoding, encode
from engine.infer import Posterior, choose_method
from engine.priors import default_priors, resolve_priors
from engine.reduce import reduce
from engine.spec import Spec, make_spec


@dataclass(frozen=True)
class Result:
    """An immutable fit: the effects, the summary and the provenance record.

    Example
    -------
    >>> result = engine.fit(df, outcome="y", treatment="t", groups=["region"])  # doctest: +SKIP
    >>> result.ate()["mean"]                                                     # doctest: +SKIP
    """

    summary: dict
    effects_table: pl.DataFrame
    provenance: dict
    posterior: Posterior
    cells: Cells
    encoding: Encoding

    def ate(self) -> dict:
        return dict(self.summary["ate"])

    def new_group(self) -> dict:
        return dict(self.summary["new_group"])

    def effects(self, level: str | None = None) -> pl.DataFrame:
        """Effects of every group, or of one level's groups."""
        if level is None:
            return self.effects_table
        if level not in self.summary["levels"]:
            from engine.errors import SpecError
            raise SpecError(f"level {level!r} is not a grouping level; levels are {self.summary['levels']}")
        return self.effects_table.filter(pl.col("level") == level)

    def save(self, out_dir) -> Path:
        """Write effects.parquet, summary.json and provenance.json, atomically."""
        return record.write_folder(out_dir, {
            "effects.parquet": self.effects_table.write_parquet,
            "summary.json": record.json_writer(self.summary),
            "provenance.json": record.json_writer(self.provenance),
        })

    def explain(self) -> str:
        return provenance.explain(self.provenance, self.summary)


def fit(data, outcome: str, treatment: str, groups=(), covariates=(), *, family="gaussian",
        method="auto", interval=0.9, priors=None, treated_value=None, draws=1000, warmup=1000,
        chains=4, seed=0, drop_missing=False, backend="polars") -> Result:
    """Fit a hierarchical treatment-effect model to rows.

    Parameters
    ----------
    data : path, glob, list of paths, Polars DataFrame/LazyFrame, pandas DataFrame or pyarrow Table
    outcome, treatment : column names
    groups : grouping columns, outermost level first (``["country", "region"]``); none → one population
    covariates : pre-treatment columns adjusted for with shared slopes
    priors : ``{name: "normal(0,1)"}`` by the names of DESIGN.md; unset ones default to the data's scale

    Example
    -------
    >>> import engine
    >>> rows, truth = engine.simulate(rows=2000, groups=20, seed=1)
    >>> result = engine.fit(rows, outcome="y", treatment="treated", groups=["group"], draws=200,
    ...                     warmup=200, chains=2)                               # doctest: +SKIP
    """
    spec = make_spec(outcome, treatment, groups, covariates, priors, family=family, method=method,
                     interval=interval, treated_value=treated_value, draws=draws, warmup=warmup,
                     chains=chains, seed=seed, drop_missing=drop_missing, backend=backend)
    return fit_spec(data, spec)


def fit_spec(data, spec: Spec) -> Result:
    started = time.perf_counter()
    source = validate.resolve_source(data)
    checked = validate.check(source, spec)
    priors = resolve_priors(
        default_priors(checked.outcome_mean, checked.outcome_sd, spec.levels, checked.covariate_sds),
        spec.priors, spec.levels, list(spec.covariates))

    reduce_start = time.perf_counter()
    cells = reduce(checked, spec)
    reduce_seconds = time.perf_counter() - reduce_start
    encoding = encode(cells)

    method, reason = choose_method(spec.method, spec.family, cells.table.height)
    posterior = _infer(method, reason, cells, encoding, priors, checked, spec)

    group_table = effects_stage.group_effects(posterior, encoding, spec.interval)
    population = effects_stage.population(posterior, spec.interval)
    total_seconds = time.perf_counter() - started
    timings = {"reduce_s": round(reduce_seconds, 3), "fit_s": round(posterior.fit_seconds, 3),
               "total_s": round(total_seconds, 3)}
    summary = {
        "family": spec.family, "method": posterior.method, "interval": spec.interval,
        "n_rows": checked.n_rows_used, "levels": list(spec.levels),
        "n_groups": {level: n for level, n in zip(spec.levels, encoding.num_nodes)},
        "ate": population["ate"], "new_group": population["new_group"], "hyper": population["hyper"],
        "diagnostics": posterior.diagnostics, "timings": timings,
    }
    record_ = provenance.build(
        checked=checked, spec=spec, priors=priors, cells_hash=cells.content_hash(),
        n_cells=cells.table.height, method=posterior.method, method_reason=posterior.method_reason,
        sampler=posterior.sampler, timings=timings, diagnostics=posterior.diagnostics,
        source_kind=source.kind, files=source.files)
    if not posterior.diagnostics["ok"]:
        import warnings

        from engine.errors import ConvergenceWarning
        warnings.warn("; ".join(posterior.diagnostics["messages"]), ConvergenceWarning, stacklevel=2)
    return Result(summary=summary, effects_table=group_table, provenance=record_, posterior=posterior,
                  cells=cells, encoding=encoding)


def _infer(method, reason, cells, encoding, priors, checked, spec) -> Posterior:
    from engine.models import gaussian

    problem = gaussian.build(cells, encoding, priors, checked.outcome_mean, checked.outcome_sd,
                             checked.covariate_means, checked.covariate_sds)
    if method == "nuts":
        from engine.infer.nuts import fit_nuts
        return fit_nuts(problem, spec, reason)
    if method == "exact":
        from engine.infer.exact import fit_exact
        return fit_exact(problem, spec, reason)
    raise AssertionError(method)
