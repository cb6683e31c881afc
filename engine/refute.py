"""Refute: a placebo refit with the treatment permuted within groups.

Permuting the treatment labels among the rows of each leaf group (seeded)
keeps every group's size, treated share and outcomes but breaks any link
between treatment and outcome, so the true effect of the placebo is zero
everywhere. Refitting with the same specification should find an effect
whose interval contains 0; an interval that excludes it says the model
finds effects where there are none (a misspecified model, outcome drift
aligned with assignment, or too few draws to trust the interval). This is the
placebo-treatment refuter of Sharma & Kiciman's DoWhy (2020), done within
groups so the hierarchy is intact.

Example
-------
>>> report = engine.refute(result, rows, draws=300)      # doctest: +SKIP
>>> report["passed"], report["placebo"]                   # doctest: +SKIP
"""
from __future__ import annotations

import ast
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import polars as pl

from engine import provenance, record, validate
from engine.errors import ConvergenceWarning, DataError, SchemaError, SpecError
from engine.spec import Spec, make_spec


def spec_from_record(record_: dict, *, draws: int, warmup: int, chains: int, seed: int) -> Spec:
    """The fit's specification, from its provenance record, with new sampler settings."""
    spec = record_.get("spec", {})
    if spec.get("estimate") or not spec.get("treatment"):
        raise DataError("the fit was made from summary-level input (one estimate per group): there is no treatment "
                        "to permute, so a placebo refit does not apply")
    priors = spec.get("priors", {})
    user = spec.get("priors_user")
    if user is None:  # records before priors_user: recover each user-set prior from the resolved ones
        user = {}
        for name in spec.get("priors_set_by_user", []):
            match = priors.get(name) or next((p for n, p in priors.items() if n.startswith(name + ".")), None)
            if match is not None:
                user[name] = match
    treated_value = spec.get("treated_value")
    if "treated_value" not in spec:
        shown = (spec.get("treatment_values") or {}).get("treated")
        if shown not in (None, "1", "True"):
            try:
                treated_value = ast.literal_eval(shown)
            except (ValueError, SyntaxError):
                treated_value = shown
    return make_spec(
        spec["outcome"], spec["treatment"], spec.get("groups", []), spec.get("covariates", []), user,
        family=spec.get("family", "gaussian"), method=spec.get("method_requested", "auto"),
        interval=spec.get("interval", 0.9), treated_value=treated_value, draws=draws, warmup=warmup,
        chains=chains, seed=seed, drop_missing=spec.get("drop_missing", False),
        noise_by_arm=spec.get("noise_by_arm", any(n.startswith("noise.") for n in priors)),
        correlated=spec.get("correlated", any(n.startswith("correlation.") for n in priors)),
        design_share=spec.get("design_share", 0.5), trials=spec.get("trials"), exposure=spec.get("exposure"),
        covariate_bins=(spec.get("covariate_route") or {}).get("bins_requested", 16))


def permute_within(frame: pl.DataFrame, treatment: str, group: str | None, seed: int) -> pl.DataFrame:
    """``frame`` with ``treatment`` permuted among the rows of each ``group`` (all rows if None).

    Example
    -------
    >>> df = pl.DataFrame({"g": ["a", "a", "b", "b"], "t": [1, 0, 1, 1]})
    >>> permute_within(df, "t", "g", seed=0).group_by("g").agg(pl.col("t").sum()).sort("g")["t"].to_list()
    [1, 2]
    """
    rng = np.random.default_rng(seed)
    height = frame.height
    if group is None:
        permutation = rng.permutation(height)
    else:
        keys = frame[group].cast(pl.String).fill_null("\x00missing").to_numpy()
        _, codes = np.unique(keys, return_inverse=True)
        grouped = np.argsort(codes, kind="stable")                 # rows, group by group
        shuffled = np.lexsort((rng.random(height), codes))         # rows, group by group, random within
        permutation = np.empty(height, dtype=np.int64)
        permutation[grouped] = shuffled
    return frame.with_columns(frame[treatment].gather(permutation))


def _read_rows(data, spec: Spec) -> pl.DataFrame:
    needed = [spec.outcome, spec.treatment, *spec.groups, *spec.reduce_covariates]
    source = validate.resolve_source(data)
    frame = source.frame
    missing = [c for c in needed if c not in frame.collect_schema()]
    if missing and source.files and all(f.path.endswith((".parquet", ".pq")) for f in source.files):
        # The fit may have read a hive-partitioned folder, whose keys live in the paths.
        try:
            frame = pl.scan_parquet([f.path for f in source.files], hive_partitioning=True)
            missing = [c for c in needed if c not in frame.collect_schema()]
        except pl.exceptions.PolarsError:
            pass
    if missing:
        raise SchemaError(f"the rows for the placebo refit lack column(s) {missing}, which the fit used; pass the "
                          "rows the fit was made from")
    try:
        rows = frame.select(needed).collect()
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"cannot read the rows for the placebo refit: {type(exc).__name__}: {exc}") from None
    if spec.drop_missing:
        # Rows without a treatment are dropped by the fit anyway; keep them out of the permutation.
        rows = rows.filter(pl.col(spec.treatment).is_not_null())
    return rows


def _load(result):
    """(provenance, summary, folder or None) from a Result or a fit folder."""
    from engine.api import Result

    if isinstance(result, Result):
        return result.provenance, result.summary, None
    if isinstance(result, (str, Path)):
        folder = Path(result)
        record_ = provenance.read_record(folder, expect=("fit",), command="refute")
        return record_, json.loads((folder / "summary.json").read_text()), folder
    raise SpecError(f"refute: expected a fit (an engine.fit Result or a folder written by `causal-engine fit`), "
                    f"found {type(result).__name__}")


def _changed_inputs(files: list[dict]) -> list[str]:
    changed = []
    for f in files:
        path = Path(f["path"])
        if not path.is_file():
            raise DataError(f"refute: input file {f['path']!r} of the fit no longer exists; restore it, or call "
                            "engine.refute(result, data) with the rows")
        stat = path.stat()
        if stat.st_size != f["size"] or abs(stat.st_mtime - f["mtime"]) > 1e-6:
            changed.append(f["path"])
    return changed


def refute(result, data=None, *, draws: int = 300, warmup: int = 300, chains: int = 2, seed: int = 0) -> dict:
    """Placebo refit: permute the treatment within leaf groups (seeded), refit with the same spec.

    Parameters
    ----------
    result : an ``engine.fit`` Result, or a folder written by ``causal-engine fit``
    data : the rows the fit was made from; None re-reads the fit's input files (provenance
        ``inputs.files``), which a fit from in-memory data or from cell tables does not have
    draws, warmup, chains : sampler settings of the refit (a placebo needs few)
    seed : seeds the permutation and the refit's sampler

    Returns the report written to ``refute.json``: ``placebo`` {mean, sd, lower, upper} at the
    fit's interval, ``passed`` (the interval contains 0), and what was done.

    Example
    -------
    >>> report = refute(result, rows)                     # doctest: +SKIP
    >>> report["passed"]                                   # doctest: +SKIP
    True
    """
    from engine.api import fit_spec

    record_, summary, folder = _load(result)
    spec = spec_from_record(record_, draws=draws, warmup=warmup, chains=chains, seed=seed)
    inputs = record_.get("inputs", {})
    changed: list[str] = []
    if data is None:
        kind = inputs.get("kind")
        if kind == "cells":
            raise DataError("refute: the fit was made from cell tables (`fit --cells`), which hold no rows to "
                            "permute; call engine.refute(result, data) with the rows, or refit from the rows")
        if kind != "files" or not inputs.get("files"):
            where = f"the fit in {str(folder)!r}" if folder else "the fit"
            raise DataError(f"refute: {where} was made from in-memory data ({kind}), so there are no input files "
                            "to re-read; in Python, call engine.refute(result, data) with the same rows")
        changed = _changed_inputs(inputs["files"])
        data = [f["path"] for f in inputs["files"]]
    rows = _read_rows(data, spec)
    leaf = spec.groups[-1] if spec.groups else None
    permuted = permute_within(rows, spec.treatment, leaf, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        placebo = fit_spec(permuted, spec)
    ate = placebo.ate()
    passed = bool(ate["lower"] <= 0.0 <= ate["upper"])
    interval = placebo.summary["interval"]
    within = f"within {leaf!r} groups" if leaf else "across all rows"
    if passed:
        message = (f"placebo (treatment permuted {within}): effect {ate['mean']:.4g}, {interval:.0%} interval "
                   f"[{ate['lower']:.4g}, {ate['upper']:.4g}] contains 0 — the model finds no effect where there is "
                   "none by construction")
    else:
        message = (f"placebo (treatment permuted {within}): effect {ate['mean']:.4g}, {interval:.0%} interval "
                   f"[{ate['lower']:.4g}, {ate['upper']:.4g}] EXCLUDES 0 — the model finds an effect where there is "
                   "none by construction; suspect the model (or too few draws: rerun with more, and another "
                   "--seed, before concluding)")
    if changed:
        message += f"; note: input file(s) {changed} changed since the fit (size or modification time)"
    return {
        "placebo": ate, "passed": passed, "interval": interval,
        "permuted_within": leaf, "seed": seed, "draws": draws, "warmup": warmup, "chains": chains,
        "diagnostics": {k: placebo.summary["diagnostics"][k] for k in ("ok", "max_rhat", "min_ess_bulk",
                                                                      "divergences", "messages")},
        "original_ate": dict(summary.get("ate", {})),
        "source": {"path": str(folder.resolve()) if folder else None,
                   "cells_sha256": inputs.get("cells_sha256"),
                   "placebo_cells_sha256": placebo.provenance["inputs"]["cells_sha256"]},
        "inputs_changed": changed,
        "created": provenance.now(),
        "versions": provenance.versions(),
        "message": message,
    }


def refute_folder(folder, **options) -> dict:
    """`refute` a fit folder and write ``folder/refute.json`` atomically (the fit's files are untouched)."""
    report = refute(folder, **options)
    folder = Path(folder)
    fd, tmp = tempfile.mkstemp(prefix=".refute.json.", dir=folder)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(record.dumps(report))
        os.replace(tmp, folder / "refute.json")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return report
