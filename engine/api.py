"""``fit``: the pipeline, top to bottom — validate → encode → reduce → model → infer → effects → record."""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from engine import effects as effects_stage
from engine import cells as cells_mod
from engine import checks as checks_stage
from engine import provenance, record, validate
from engine.cells import Cells
from engine.errors import ConvergenceWarning, DataError, SpecError
from engine.encode import Encoding, encode
from engine.infer import Posterior, choose_method
from engine.priors import default_priors, resolve_priors, structural_priors
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
            raise SpecError(f"level {level!r} is not a grouping level; levels are {self.summary['levels']}")
        return self.effects_table.filter(pl.col("level") == level)

    def group_draws(self, level: str):
        """Retained joint posterior draws of every group's effect at ``level``.

        Returns (draws (kept, groups) float32, keys in the order of ``effects(level)``).
        All draws when they fit the memory budget, else an evenly thinned subset.
        """
        keys = self.effects(level)["group"]  # also checks that the level exists
        return self.posterior.groups[self.summary["levels"].index(level)].draws, keys

    def save(self, out_dir) -> Path:
        """Write effects.parquet, summary.json, provenance.json and draws.npz, atomically."""
        return record.write_folder(out_dir, {
            "effects.parquet": self.effects_table.write_parquet,
            "summary.json": record.json_writer(self.summary),
            "provenance.json": record.json_writer(self.provenance),
            "draws.npz": self._write_draws,
        })

    def _write_draws(self, path) -> None:
        """The retained joint draws, aligned: row k of every array is the same posterior draw."""
        import numpy as np

        ate = self.posterior.ate.reshape(-1)
        new_group = self.posterior.new_group.reshape(-1)
        if self.posterior.groups:
            index = self.posterior.groups[0].draw_index
        else:
            index = np.arange(ate.shape[0])
        arrays = {"draw_index": index, "ate": ate[index].astype(np.float32),
                  "new_group": new_group[index].astype(np.float32)}
        for level, summary in zip(self.summary["levels"], self.posterior.groups):
            arrays[f"effect.{level}"] = summary.draws
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)

    def explain(self) -> str:
        return provenance.explain(self.provenance, self.summary)


# Parts of fit_s that the sampler records (seconds, compiling included), copied into timings.
TIMING_SPLIT = ("sample_s", "optimise_s", "downward_s")


def fit(data, outcome: str | None = None, treatment: str | None = None, groups=(), covariates=(), *,
        family="gaussian", method="auto", interval=0.9, priors=None, treated_value=None, draws=1000,
        warmup=1000, chains=4, seed=0, drop_missing=False, backend="polars", estimate=None,
        stderr=None, noise_by_arm=False, correlated=False, design_share=0.5, trials=None,
        exposure=None, covariate_bins=16, keep_draws=None, scheduler=None) -> Result:
    """Fit a hierarchical treatment-effect model to rows.

    Parameters
    ----------
    data : path, glob, list of paths, Polars DataFrame/LazyFrame, pandas DataFrame or pyarrow Table
    outcome, treatment : column names
    groups : grouping columns, outermost level first (``["country", "region"]``); none → one population
    covariates : pre-treatment columns adjusted for with shared slopes
    priors : ``{name: "normal(0,1)"}`` by the names of DESIGN.md; unset ones default to the data's scale
    noise_by_arm : one residual sd per arm instead of a shared one
    correlated : baseline and effect correlated within each level (prior ``correlation ~ lkj(2)``)
    design_share : the share of rows the design assigned to treatment; the sample ratio check
        (``summary["checks"]``) compares the observed share with it
    family : ``gaussian`` (default), ``bernoulli`` (0/1 outcome), ``binomial`` (outcome counts
        successes out of ``trials``) or ``poisson`` (counts, optionally per ``exposure``); GLM
        effects are risk or rate differences, with the log odds or log rate ratio in ``link_*``
    trials, exposure : the binomial trials column; the Poisson exposure column (default 1 per row)
    covariate_bins : GLM families with covariates: quantile bins per covariate; each bin of each
        (group, arm) is a cell whose rows share the bin's mean covariate (the "binned" route)
    estimate, stderr : summary-level input instead of rows: one effect estimate and its standard
        error per (leaf) group — meta-analysis of many experiments (``outcome`` and ``treatment`` unset)
    keep_draws : how many joint posterior draws of every group to retain (``draws.npz``, transport,
        decisions), evenly thinned over chains × draws; default: as many as 256 MiB holds (every
        draw when they fit). Means, sds and P(effect > 0) use every draw either way. All of
        them: ``draws * chains``.
    scheduler : ``backend="dask"``: the scheduler's address (``tcp://host:8786``, as the CLI's
        ``--scheduler``); None starts a local cluster for the call

    Example
    -------
    >>> import engine
    >>> rows, truth = engine.simulate(rows=2000, groups=20, seed=1)
    >>> result = engine.fit(rows, outcome="y", treatment="treated", groups=["group"], draws=200,
    ...                     warmup=200, chains=2)                               # doctest: +SKIP
    """
    spec = make_spec(outcome, treatment, groups, covariates, priors, family=family, method=method,
                     interval=interval, treated_value=treated_value, draws=draws, warmup=warmup,
                     chains=chains, seed=seed, drop_missing=drop_missing, backend=backend,
                     estimate=estimate, stderr=stderr, noise_by_arm=noise_by_arm, correlated=correlated,
                     design_share=design_share, trials=trials, exposure=exposure,
                     covariate_bins=covariate_bins, keep_draws=keep_draws, scheduler=scheduler)
    return fit_spec(data, spec)


def fit_spec(data, spec: Spec, cell_paths=None) -> Result:
    """Run the pipeline for a checked spec, from rows (``data``) or from cell tables."""
    started = time.perf_counter()
    reduce_start = time.perf_counter()
    if cell_paths is not None:
        cells, checked, source = _from_cells(cell_paths, spec)
    elif spec.summary_level:
        source = validate.resolve_source(data)
        table, checked = validate.check_estimates(source, spec)
        cells = Cells(table.with_columns(pl.lit(1, pl.Int8).alias("arm"), pl.lit(1, pl.Int64).alias("n")),
                      tuple(spec.groups))
    else:
        source = validate.resolve_source(data)
        checked = validate.check(source, spec)
        reduce_start = time.perf_counter()
        cells = reduce(checked, spec)
    reduce_seconds = time.perf_counter() - reduce_start
    encoding = encode(cells)
    problem, priors = _model(cells, encoding, spec)
    method, reason = choose_method(spec.method, spec.family, cells.table.height)
    _check_kept_memory(spec, sum(problem.real_nodes))
    posterior = _infer(method, reason, problem, spec)

    group_table = effects_stage.group_effects(posterior, encoding)
    population = effects_stage.population(posterior, spec.interval)
    trust = checks_stage.trust_checks(cells, spec, encoding.nodes[-1] if encoding.nodes else None)
    covariates = checks_stage.covariate_profile(cells, checked)
    total_seconds = time.perf_counter() - started
    timings = {"reduce_s": round(reduce_seconds, 3), "fit_s": round(posterior.fit_seconds, 3),
               "total_s": round(total_seconds, 3),
               # Where the fit's time went, for the methods that split it (hyperparameter
               # sampling or optimisation, then the downward passes over every group).
               **{key: posterior.sampler[key] for key in TIMING_SPLIT if key in posterior.sampler}}
    summary = {
        "family": spec.family, "method": posterior.method, "interval": spec.interval,
        "n_rows": cells.n_rows, "levels": list(spec.levels),
        "n_groups": {level: n for level, n in zip(spec.levels, encoding.num_nodes)},
        "ate": population["ate"], **{k: population[k] for k in ("ate_link", "new_group_link") if k in population},
        "new_group": population["new_group"], "hyper": population["hyper"],
        "diagnostics": posterior.diagnostics, "checks": trust, "covariates": covariates, "timings": timings,
    }
    if spec.binned:
        summary["covariate_route"] = provenance.covariate_route(spec, checked)
    record_ = provenance.build(
        checked=checked, spec=spec, priors=priors, cells_hash=cells.content_hash(),
        n_cells=cells.table.height, method=posterior.method, method_reason=posterior.method_reason,
        sampler=posterior.sampler, timings=timings, diagnostics=posterior.diagnostics,
        source_kind=source.kind, files=source.files)
    record_["checks"], record_["covariates"] = trust, covariates
    if not posterior.diagnostics["ok"]:
        warnings.warn("; ".join(posterior.diagnostics["messages"]), ConvergenceWarning, stacklevel=3)
    return Result(summary=summary, effects_table=group_table, provenance=record_, posterior=posterior,
                  cells=cells, encoding=encoding)


def _model(cells: Cells, encoding: Encoding, spec: Spec):
    """The model stage: default priors scaled to the data, then the problem in standardised units."""
    from engine.models import gaussian

    if spec.summary_level:
        scale = float((cells.table["estimate"].var(ddof=0) + (cells.table["stderr"] ** 2).mean()) ** 0.5)
        defaults = {name: prior for name, prior in default_priors(0.0, scale, spec.levels, {}).items()
                    if name.split(".")[0] in ("effect_mean", "effect_scale")}
        priors = resolve_priors(defaults, spec.priors, spec.levels, [])
        return gaussian.build_estimates(cells.table, encoding, priors, spec.levels), priors
    _check_arms(cells, spec)
    if spec.is_glm:
        from engine.models import glm
        defaults = structural_priors(glm.default_priors(cells, spec.family, spec.weight_column, spec.levels,
                                                        spec.covariates),
                                     spec.levels, False, spec.correlated)
        priors = resolve_priors(defaults, spec.priors, spec.levels, list(spec.covariates))
        return glm.build(cells, encoding, priors, spec.family, spec.weight_column, spec.covariates), priors
    moments = cells.pooled_moments()
    y_mean, y_sd = moments["y"]
    x_means = {x: moments[x][0] for x in cells.covariates}
    x_sds = {x: moments[x][1] for x in cells.covariates}
    defaults = structural_priors(default_priors(y_mean, y_sd, spec.levels, x_sds), spec.levels,
                                 spec.noise_by_arm, spec.correlated)
    priors = resolve_priors(defaults, spec.priors, spec.levels, list(spec.covariates))
    return gaussian.build(cells, encoding, priors, y_mean, y_sd, x_means, x_sds), priors


def _check_kept_memory(spec: Spec, nodes: int) -> None:
    """Refuse ``keep_draws`` that would need more than half this machine's memory, before
    any compute."""
    if spec.keep_draws is None:
        return
    kept = min(spec.keep_draws, spec.draws * spec.chains)
    need = kept * nodes * 4
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    if total and need > total / 2:
        fits = max(int(total / 2 // (nodes * 4)), 1)
        raise SpecError(f"keep_draws={spec.keep_draws}: {kept} retained draws of {nodes} groups need "
                        f"{need / 2**30:.1f} GiB (float32), more than half of this machine's "
                        f"{total / 2**30:.1f} GiB; pass keep_draws ≤ {fits} (--keep-draws {fits}) or leave it unset")


def _check_arms(cells: Cells, spec: Spec) -> None:
    control, treated = cells.arm_rows()
    if control == 0 or treated == 0:
        arm = "treated" if treated == 0 else "control"
        raise DataError(f"treatment column {spec.treatment!r}: no {arm} rows remain; an effect needs both arms")


def _from_cells(paths, spec: Spec):
    """Cell tables from `causal-engine reduce` (one or many sites), merged exactly."""
    spec.check_cells_shareable()
    paths = [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    for p in paths:
        if not Path(p).is_file():
            raise DataError(f"cell table {p!r}: no such file")
    cells = cells_mod.read(paths, levels=spec.groups)
    if tuple(cells.covariates) != tuple(spec.reduce_covariates):
        raise SpecError(f"cell tables carry covariate moments of {list(cells.covariates)} but the fit needs "
                        f"{list(spec.reduce_covariates)}; pass the same --covariate (and --trials or "
                        "--exposure) options as to reduce")
    files = tuple(validate.InputFile(p, Path(p).stat().st_size, Path(p).stat().st_mtime) for p in paths)
    source = validate.Source(frame=None, kind="cells", files=files)
    checked = validate.Checked(source=source, rows=None, n_rows_read=cells.n_rows, n_rows_used=cells.n_rows,
                               dropped={}, schema={k: str(v) for k, v in cells.table.schema.items()},
                               treatment_values={"treated": "arm 1", "control": "arm 0"})
    return cells, checked, source


def _infer(method, reason, problem, spec) -> Posterior:
    if method == "nuts":
        from engine.infer.nuts import fit_nuts
        return fit_nuts(problem, spec, reason)
    if method == "exact":
        from engine.infer.exact import fit_exact
        return fit_exact(problem, spec, reason)
    if method == "laplace":
        from engine.infer.laplace import fit_laplace
        return fit_laplace(problem, spec, reason)
    if method == "svi":
        from engine.infer.svi import fit_svi
        return fit_svi(problem, spec, reason)
    raise AssertionError(method)
