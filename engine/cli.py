"""The ``causal-engine`` command, thin over the API.

Each sub-command imports only what it uses: ``reduce`` and ``simulate`` never
load JAX or NumPyro. Exit codes: 0 success, 2 bad usage or bad input (one
message on stderr, nothing written), 1 internal error.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path


def _add_columns(p: argparse.ArgumentParser, outcome_required=True) -> None:
    p.add_argument("--outcome", required=outcome_required, help="outcome column")
    p.add_argument("--treatment", required=outcome_required, help="treatment column (0/1, bool or two values)")
    p.add_argument("--treated-value", default=None, help="the treated value when the treatment is not 0/1")
    p.add_argument("--group", action="append", default=[], metavar="COL",
                   help="grouping column; repeat, outermost level first")
    p.add_argument("--covariate", action="append", default=[], metavar="COL",
                   help="pre-treatment covariate with a shared slope; repeatable")
    p.add_argument("--family", default="gaussian", help="gaussian, bernoulli, binomial or poisson")
    p.add_argument("--trials", default=None, metavar="COL", help="binomial: trials per row (outcome: successes)")
    p.add_argument("--exposure", default=None, metavar="COL", help="poisson: exposure per row (default 1)")
    p.add_argument("--covariate-bins", type=int, default=16, metavar="K",
                   help="bernoulli/binomial/poisson with --covariate: quantile bins per covariate (default 16)")
    p.add_argument("--drop-missing", action="store_true",
                   help="drop rows with missing/NaN/infinite values instead of refusing them")
    p.add_argument("--backend", default="polars", help="reduce backend: polars, dask or jax")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="dask backend: scheduler address (tcp://host:8786); default a local cluster")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="causal-engine",
                                     description="Hierarchical Bayesian treatment effects, from rows to decisions.")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit a hierarchical effects model and write DIR")
    fit.add_argument("data", nargs="*", help="Parquet/CSV/Arrow files, globs or a hive folder")
    _add_columns(fit, outcome_required=False)
    fit.add_argument("--estimate", default=None, metavar="COL",
                     help="summary-level input: one effect estimate per group (with --stderr, --group)")
    fit.add_argument("--stderr", default=None, metavar="COL", help="standard error of --estimate")
    fit.add_argument("--cells", nargs="+", default=None, metavar="CELLS.parquet",
                     help="fit from cell tables written by `causal-engine reduce` instead of rows")
    fit.add_argument("--noise-by-arm", action="store_true", help="one residual sd per arm")
    fit.add_argument("--correlated", action="store_true",
                     help="baseline and effect correlated within each level (correlation ~ lkj(2))")
    fit.add_argument("--method", default="auto")
    fit.add_argument("--interval", type=float, default=0.9)
    fit.add_argument("--prior", action="append", default=[], metavar="NAME=DIST",
                     help="e.g. effect_scale=halfnormal(1); repeatable")
    fit.add_argument("--draws", type=int, default=1000, help="draws per chain after warm-up")
    fit.add_argument("--warmup", type=int, default=1000, help="warm-up iterations per chain")
    fit.add_argument("--chains", type=int, default=4)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--keep-draws", type=_keep_draws, default=None, metavar="N|all",
                     help="joint draws of every group to retain in draws.npz (default: as many as 256 MiB holds)")
    fit.add_argument("--design-share", type=float, default=0.5, metavar="P",
                     help="share of rows the design assigned to treatment, for the sample ratio check (default 0.5)")
    fit.add_argument("--out", required=True, metavar="DIR")

    red = sub.add_parser("reduce", help="rows → cell table (share cells, not rows)")
    red.add_argument("data", nargs="+")
    _add_columns(red)
    red.add_argument("--out", required=True, metavar="CELLS.parquet")

    sim = sub.add_parser("simulate", help="a randomised experiment with known truth")
    sim.add_argument("--rows", type=int, default=20_000)
    sim.add_argument("--groups", type=int, default=1_000)
    sim.add_argument("--levels", default="group", help="comma-separated level names, outermost first")
    sim.add_argument("--covariate", action="store_true", help="add a pre-period covariate column 'pre'")
    sim.add_argument("--family", default="gaussian",
                     help="gaussian, bernoulli, binomial (adds 'trials') or poisson (adds 'exposure')")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--out", required=True, metavar="DIR")

    val = sub.add_parser("validate", help="simulation-based calibration (SBC) of a method")
    val.add_argument("--method", default="exact", choices=["exact", "nuts", "laplace"],
                     help="exact and nuts: Gaussian cells; laplace: Bernoulli cells (logit link)")
    val.add_argument("--groups", type=int, default=40, help="leaf groups in each simulated problem")
    val.add_argument("--levels", type=int, default=1, help="nesting depth of the simulated groups")
    val.add_argument("--rows", type=int, default=200, help="rows in each simulated problem (long tail)")
    val.add_argument("--replications", type=int, default=100)
    val.add_argument("--draws", type=int, default=200, help="draws per chain after warm-up")
    val.add_argument("--warmup", type=int, default=300)
    val.add_argument("--chains", type=int, default=2)
    val.add_argument("--thin", type=int, default=19, help="posterior draws kept per replication for ranks")
    val.add_argument("--bins", type=int, default=5, help="rank histogram bins for the χ² test")
    val.add_argument("--seed", type=int, default=0)
    val.add_argument("--out", default=None, metavar="DIR", help="write DIR/sbc.json")

    exp = sub.add_parser("explain", help="print the provenance trail of a fit, transport or decision folder")
    exp.add_argument("dir")

    ref = sub.add_parser("refute", help="placebo refit: permute the treatment within groups; writes DIR/refute.json")
    ref.add_argument("dir", metavar="DIR", help="a folder written by `causal-engine fit` from files")
    ref.add_argument("--draws", type=int, default=300, help="draws per chain of the refit (default 300)")
    ref.add_argument("--warmup", type=int, default=300, help="warm-up iterations per chain (default 300)")
    ref.add_argument("--chains", type=int, default=2, help="chains of the refit (default 2)")
    ref.add_argument("--seed", type=int, default=0, help="seeds the permutation and the refit")

    tra = sub.add_parser("transport", help="the effect for a target population, with a shift check")
    tra.add_argument("dir", metavar="FIT_DIR", help="a folder written by `causal-engine fit`")
    tra.add_argument("--target", nargs="+", required=True, metavar="DATA",
                     help="the target population: rows (the fit's grouping columns and covariates), or group "
                          "counts with --count")
    tra.add_argument("--count", default=None, metavar="COL",
                     help="the target is one row per group with its number of rows in COL")
    tra.add_argument("--max-smd", default="0.25", metavar="X",
                     help="warn when a covariate's standardized mean difference exceeds X (default 0.25)")
    tra.add_argument("--max-outside", default="0.05", metavar="P",
                     help="warn when more than P of target rows lie outside the fit's covariate range (default 0.05)")
    tra.add_argument("--max-unseen", default="0.2", metavar="P",
                     help="warn when more than P of target rows are in groups the fit never saw (default 0.2)")
    tra.add_argument("--seed", type=int, default=0, help="seeds the predictive draws of unseen groups")
    tra.add_argument("--out", required=True, metavar="DIR")

    dec = sub.add_parser("decide", help="the action per group maximizing expected utility, with EVPI")
    dec.add_argument("dir", metavar="DIR", help="a folder written by `causal-engine fit` or `causal-engine transport`")
    dec.add_argument("--benefit", required=True, metavar="B", help="value of one unit of effect, per row")
    dec.add_argument("--cost", required=True, metavar="C", help="cost of treating one row")
    dec.add_argument("--level", default=None, metavar="L", help="grouping level to decide for (default the deepest)")
    dec.add_argument("--out", required=True, metavar="DIR")
    return parser


def _keep_draws(text: str):
    """``--keep-draws``: a positive integer or ``all``."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of draws or 'all', found {text!r}") from None


def _spec(args, outcome=None, treatment=None):
    from engine.priors import parse_prior_assignment
    from engine.spec import Spec

    priors = dict(parse_prior_assignment(p, args.group) for p in getattr(args, "prior", []))
    options = {k: getattr(args, k) for k in ("family", "method", "interval", "draws", "warmup", "chains",
                                              "seed", "noise_by_arm", "correlated", "design_share", "trials",
                                              "exposure", "covariate_bins")
               if hasattr(args, k)}
    if getattr(args, "keep_draws", None) is not None:
        options["keep_draws"] = args.draws * args.chains if args.keep_draws == "all" else args.keep_draws
    summary = {k: getattr(args, k) for k in ("estimate", "stderr") if getattr(args, k, None)}
    return Spec(outcome=outcome or args.outcome, treatment=treatment or args.treatment, **summary,
                groups=tuple(args.group), covariates=tuple(args.covariate), treated_value=args.treated_value,
                priors=priors, drop_missing=args.drop_missing, backend=args.backend,
                scheduler=args.scheduler, **options)


def _cmd_fit(args) -> int:
    from engine.errors import SpecError

    if args.cells:
        if args.data:
            raise SpecError("pass either DATA or --cells, not both")
        from engine.cells import read_metadata
        meta = read_metadata(args.cells[0])
        spec = _spec(args, outcome=args.outcome or meta.get("outcome", "outcome"),
                     treatment=args.treatment or meta.get("treatment", "treatment"))
        spec.check_cells_shareable()
    else:
        if not args.data:
            raise SpecError("no input: pass DATA files (or --cells CELLS.parquet)")
        if not (args.outcome and args.treatment) and not (args.estimate or args.stderr):
            raise SpecError("--outcome and --treatment are required when fitting rows "
                            "(or --estimate and --stderr for summary-level input)")
        spec = _spec(args)
    from engine.api import fit_spec

    result = fit_spec(args.data, spec, cell_paths=args.cells)
    out = result.save(args.out)
    s = result.summary
    ate, d = s["ate"], s["diagnostics"]
    print(f"ATE {ate['mean']:.4g} (sd {ate['sd']:.3g}), {s['interval']:.0%} interval "
          f"[{ate['lower']:.4g}, {ate['upper']:.4g}]  method {s['method']}, {s['n_rows']} rows, "
          f"groups {s['n_groups'] or 'none'}")
    if "ate_link" in s:
        link = s["ate_link"]
        print(f"  (ATE as a risk/rate difference; log odds/rate ratio {link['mean']:.4g} "
              f"[{link['lower']:.4g}, {link['upper']:.4g}])")
    print(f"diagnostics: {'ok' if d['ok'] else 'NOT OK'}; " + ("; ".join(d["messages"]) or
          f"max R-hat {d['max_rhat']:.3f}, min bulk ESS {d['min_ess_bulk']:.0f}"))
    checks = s.get("checks") or {}
    if checks.get("sample_ratio"):
        srm = checks["sample_ratio"]
        smds = ", ".join(f"{x} {b['smd']:+.3f}" for x, b in checks["balance"]["covariates"].items())
        print(f"checks: {'ok' if checks['ok'] else 'NOT OK'}; treated share {srm['observed_share']:.2%} vs design "
              f"{srm['design_share']:.2%} (p = {srm['p_value']:.2g})" + (f"; balance SMD {smds}" if smds else "")
              + "; placebo: run `causal-engine refute DIR`")
        for message in checks.get("messages", []):
            print(f"  ! {message}")
    print(f"wrote {out}/effects.parquet, summary.json, provenance.json, draws.npz")
    return 0


def _cmd_reduce(args) -> int:
    from engine import validate
    from engine.cells import write_cells
    from engine.reduce import reduce

    spec = _spec(args)
    spec.check_cells_shareable()
    checked = validate.check(validate.resolve_source(args.data), spec)
    cells = reduce(checked, spec)
    write_cells(cells, args.out, {"outcome": spec.outcome, "treatment": spec.treatment,
                                  "rows_read": str(checked.n_rows_read),
                                  "rows_dropped": json.dumps(checked.dropped)})
    print(f"{checked.n_rows_used} rows → {cells.table.height} cells, wrote {args.out}")
    return 0


def _cmd_simulate(args) -> int:
    from engine import record
    from engine.simulate import simulate

    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    sim = simulate(rows=args.rows, groups=args.groups, levels=levels, seed=args.seed, covariate=args.covariate,
                   family=args.family)
    record.write_folder(args.out, {
        "rows.parquet": sim.rows.write_parquet,
        "truth.parquet": sim.truth.write_parquet,
        "truth.json": record.json_writer({"ate": sim.ate, "params": sim.params}),
    })
    print(f"wrote {args.out}/rows.parquet ({sim.rows.height} rows, {args.groups} leaf groups), "
          f"truth.parquet, truth.json (true ATE {sim.ate:.4g})")
    return 0


def _cmd_validate(args) -> int:
    from engine import record
    from engine.errors import SpecError
    from engine.infer.calibrate import run_sbc

    for name in ("groups", "levels", "replications", "draws", "warmup", "chains", "thin", "bins"):
        if getattr(args, name) < 1:
            raise SpecError(f"--{name}: expected a positive integer, found {getattr(args, name)}")
    if args.rows < args.groups:
        raise SpecError(f"--rows {args.rows} must be at least --groups {args.groups}")

    def progress(done, total):
        print(f"\r  replication {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    calibration = run_sbc(method=args.method, groups=args.groups, levels=args.levels, rows=args.rows,
                          replications=args.replications, draws=args.draws, warmup=args.warmup,
                          chains=args.chains, thinned=args.thin, bins=args.bins, seed=args.seed,
                          progress_fn=progress)
    report = calibration.as_dict()
    print(f"SBC of {args.method}: {args.replications} replications, ranks among {args.thin} thinned draws, "
          f"{args.bins} bins ({report['seconds']:.0f} s)")
    for name, p in report["p_values"].items():
        print(f"  {name:28s} p = {p:.3f}   histogram {report['histograms'][name]}")
    print("calibrated: no parameter rejects uniformity at 1% (Bonferroni)" if report["ok"]
          else "NOT calibrated: some rank histogram is not uniform")
    if args.out:
        record.write_folder(args.out, {"sbc.json": record.json_writer(report)})
    return 0


def _cmd_explain(args) -> int:
    from engine.errors import DataError
    from engine.provenance import KINDS, explain

    folder = Path(args.dir)
    path = folder / "provenance.json"
    if not path.is_file():
        raise DataError(f"{args.dir!r} holds no provenance.json; pass a folder written by `causal-engine fit`, "
                        "`transport` or `decide`")
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{str(path)!r} cannot be read as JSON ({exc}); "
                        "pass a folder written by causal-engine") from None

    def read(name):
        p = folder / name
        return json.loads(p.read_text()) if p.is_file() else None

    kind = record.get("kind", "fit")
    print(explain(record, read(KINDS.get(kind, "summary.json")), read("refute.json") if kind == "fit" else None))
    return 0


def _same_folder(out: str, source: str) -> bool:
    return Path(out).resolve() == Path(source).resolve()


def _refuse_overwrite(args, command: str) -> None:
    from engine.errors import SpecError

    if _same_folder(args.out, args.dir):
        raise SpecError(f"--out {args.out!r} is the {command} input folder itself; writing there would replace it — "
                        "pass another --out folder")


def _cmd_refute(args) -> int:
    from engine.refute import refute_folder

    report = refute_folder(args.dir, draws=args.draws, warmup=args.warmup, chains=args.chains, seed=args.seed)
    print(report["message"])
    if not report["diagnostics"]["ok"]:
        print("refit diagnostics: NOT OK; " + "; ".join(report["diagnostics"]["messages"]))
    print(f"wrote {Path(args.dir) / 'refute.json'}")
    return 0


def _cmd_transport(args) -> int:
    from engine.transport import transport

    _refuse_overwrite(args, "transport")
    moved = transport(args.dir, args.target, count=args.count, max_smd=args.max_smd,
                      max_outside=args.max_outside, max_unseen=args.max_unseen, seed=args.seed)
    r = moved.report
    ate, src = r["ate"], r["source_ate"]
    print(f"target ATE {ate['mean']:.4g} (sd {ate['sd']:.3g}), {r['interval']:.0%} interval "
          f"[{ate['lower']:.4g}, {ate['upper']:.4g}]; fitted population's ATE {src['mean']:.4g}")
    print(f"{r['unseen_share']:.1%} of target rows in groups the fit never saw; verdict {r['verdict'].upper()}")
    for x, shift in r["shift"].items():
        outside = "n/a" if shift["outside_share"] is None else f"{shift['outside_share']:.1%}"
        print(f"  shift of {x!r}: SMD {shift['smd']:+.3f}, {outside} of target rows outside the fitted range")
    for message in r["messages"]:
        print(f"  ! {message}")
    out = moved.save(args.out)
    print(f"wrote {out}/transport.json, target_groups.parquet, draws.npz, provenance.json")
    return 0


def _cmd_decide(args) -> int:
    from engine.decide import decide

    _refuse_overwrite(args, "decide")
    decision = decide(args.dir, args.benefit, args.cost, level=args.level)
    s = decision.summary
    pop, totals = s["population"], s["totals"]
    print(f"whole population: {pop['action']} (expected utility per row {pop['expected_utility']:.4g}, "
          f"P(best) {pop['prob_best']:.2f}, EVPI per row {pop['evpi']:.3g})")
    print(f"per {s['level']!r} group: treat {totals['treat_groups']}, control {totals['control_groups']}; total "
          f"expected utility {totals['expected_utility']:.4g}, total EVPI {totals['evpi']:.4g}")
    for g in s["value_of_information"][:3]:
        print(f"  more data worth most in {g['group']!r}: EVPI {g['evpi_total']:.3g} in total ({g['n']:.0f} rows)")
    out = decision.save(args.out)
    print(f"wrote {out}/decisions.parquet, decisions.json, provenance.json")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from engine.errors import ConvergenceWarning, EngineError

    handler = {"fit": _cmd_fit, "reduce": _cmd_reduce, "simulate": _cmd_simulate, "validate": _cmd_validate,
               "explain": _cmd_explain, "refute": _cmd_refute, "transport": _cmd_transport, "decide": _cmd_decide}
    try:
        with warnings.catch_warnings():
            # The CLI prints diagnostics itself; the API's warning would repeat them.
            warnings.simplefilter("ignore", category=ConvergenceWarning)
            return handler[args.command](args)
    except EngineError as exc:
        print(f"causal-engine {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
