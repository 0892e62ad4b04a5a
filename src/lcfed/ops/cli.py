"""Command line: ``python -m lcfed {data,run,job,evaluate,predict,export} ...``.

Examples::

    python -m lcfed data demo --out data/demo
    python -m lcfed data import prostate --src /data/MultiSitePro --out data/prostate
    python -m lcfed run --algo lcfed --data data/demo --workspace runs/lcfed
    python -m lcfed job export --algo lcfed --data data/prostate --preset paper --out my_jobs
    python -m lcfed bench --data data/demo --seeds 3 --out benchmark/demo
    python -m lcfed predict --model runs/lcfed/models/site-a/lcfed/best.pt --input scans/ --out masks/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


def _options(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("rounds", "iterations", "seed", "batch_size", "lr", "alpha", "hc_rounds", "hc_lr", "personal_iterations")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from lcfed.runtime.config import PRESETS
    from lcfed.runtime.fl.quantization import GPU_TYPES, QUANTIZATION_TYPES

    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="model/schedule preset (default: demo)")
    p.add_argument(
        "--rounds", type=int, help="federated rounds of network training, for every algorithm (default: the preset's)"
    )
    p.add_argument(
        "--hc-rounds",
        dest="hc_rounds",
        type=int,
        help="staged HC: HC-only rounds after --rounds, network frozen (default: a quarter of --rounds)",
    )
    p.add_argument("--hc-lr", dest="hc_lr", type=float, help="Adam learning rate of Head Calibration (default: --lr)")
    p.add_argument(
        "--personal-iterations",
        dest="personal_iterations",
        type=int,
        help="head-only iterations at the start of each round (default: the preset's)",
    )
    p.add_argument("--iterations", type=int, help="local iterations per round (default: the preset's)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="batch size")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--alpha", type=float, help="weight of the contrastive term")
    p.add_argument("--seed", type=int, help="seed (initialisation, sampling)")
    p.add_argument(
        "--quantize",
        default="",
        choices=("",) + QUANTIZATION_TYPES,
        metavar="TYPE",
        help=f"quantize every training message both ways with FLARE's message quantization: one of "
        f"{', '.join(QUANTIZATION_TYPES)} ({', '.join(GPU_TYPES)} need bitsandbytes on a GPU); default float32",
    )


def build_parser() -> argparse.ArgumentParser:
    from lcfed.ops.data.demo import REGIMES
    from lcfed.ops.data.importers import KINDS
    from lcfed.runtime.algorithms import ALGORITHMS

    parser = argparse.ArgumentParser(
        prog="python -m lcfed",
        description=__doc__.split("\n")[0],
        epilog="--verbose (anywhere on the line): show FLARE's whole log and, on failure, the traceback",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build or import data sets").add_subparsers(dest="data_command", required=True)
    demo = data.add_parser("demo", help="build the embedded multi-site demo set (ICBM152 anatomy)")
    demo.add_argument("--out", required=True, help="output folder")
    demo.add_argument("--sites", type=int, default=4, help="number of sites (default 4)")
    demo.add_argument("--size", type=int, default=96, help="image size (default 96)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    demo.add_argument(
        "--regime",
        default="rich",
        choices=REGIMES,
        help="rich (default): 20/14/9/7 patients, 6 labelled slices each; scarce: 2/2/1/1 training patients "
        "with 1 labelled slice each, more varied anatomy, milder annotation shifts, no T2-like contrast "
        "inversion, as many validation/test patients as rich",
    )

    imp = data.add_parser("import", help="import a real data layout into the bundle's convention")
    imp.add_argument("kind", choices=KINDS)
    imp.add_argument("--src", required=True, help="the data set as downloaded")
    imp.add_argument("--out", required=True, help="output folder")
    imp.add_argument("--size", type=int, help="resize to SIZE x SIZE (default: keep)")
    imp.add_argument("--seed", type=int, default=0, help="seed of the patient-wise split")
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    eff = data.add_parser("site-effect", help="train on one site, test on every site (how different sites are)")
    eff.add_argument("--data", required=True)
    eff.add_argument("--site", help="site to train on (default: the first)")
    _add_train_options(eff)

    run = sub.add_parser("run", help="run a job in FLARE's simulator and write results/")
    run.add_argument("--algo", default="lcfed", choices=sorted(ALGORITHMS))
    run.add_argument("--data", required=True, help="data set folder (dataset.json + one folder per site)")
    run.add_argument("--workspace", required=True, help="run folder (job, simulator workspace, results)")
    run.add_argument("--parallel", type=int, help="clients run at a time (default: all sites)")
    run.add_argument("--overwrite", action="store_true", help="replace a previous run in --workspace")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --workspace from its last round (server state and every site's state) "
        "up to --rounds in total",
    )
    _add_train_options(run)

    job = sub.add_parser("job", help="export FLARE job folders").add_subparsers(dest="job_command", required=True)
    exp = job.add_parser("export", help="export one job folder")
    exp.add_argument("--algo", default="lcfed", choices=sorted(ALGORITHMS))
    exp.add_argument("--out", required=True, help="folder to write <name>/ into")
    exp.add_argument("--name", default="", help="job name (default: the algorithm)")
    exp.add_argument("--data", help="take sites, channels and classes from this data set's dataset.json")
    exp.add_argument("--sites", help="comma-separated ordered site list (default: the demo's four sites)")
    exp.add_argument("--channels", type=int, help="image channels (default 1)")
    exp.add_argument("--classes", type=int, help="output classes (default 2)")
    exp.add_argument("--min-clients", dest="min_clients", type=int, default=0, help="default: all sites")
    exp.add_argument("--weighting", default="uniform", choices=("uniform", "samples"))
    exp.add_argument("--drop-stale-heads", action="store_true", help="forget the head of a site that misses a round")
    exp.add_argument("--round-timeout", type=int, default=3600, help="seconds a round waits for sites")
    exp.add_argument("--resume", action="store_true", help="continue the run saved under this job name")
    exp.add_argument("--send-diffs", action="store_true", help="sites send differences instead of weights")
    exp.add_argument(
        "--exclude-vars", default="", help="regular expression of shared keys no site sends (FLARE ExcludeVars)"
    )
    exp.add_argument(
        "--percentile-privacy",
        metavar="PERCENTILE,GAMMA",
        help="add FLARE's PercentilePrivacy filter to every site's result (e.g. 10,0.01); implies --send-diffs",
    )
    _add_train_options(exp)
    committed = job.add_parser("export-committed", help="re-export the job folders committed under jobs/")
    committed.add_argument("--out", default="jobs")
    pack = job.add_parser(
        "pack", help="a BYOC copy of a job carrying the bundle's runtime code (for sites without the bundle)"
    )
    pack.add_argument("job", help="a configuration-only job folder (e.g. jobs/lcfed)")
    pack.add_argument("--out", required=True, help="folder to write <job name>/ into")

    bench = sub.add_parser("bench", help="every algorithm in the simulator over several seeds: table, plots, test")
    bench.add_argument(
        "--data",
        required=True,
        nargs="+",
        action="append",
        metavar="[NAME=]DIR",
        help="data set(s), one table each: NAME=DIR or DIR (named after its demo regime or its folder); "
        "repeatable, e.g. --data rich=data/demo scarce=data/demo-scarce",
    )
    bench.add_argument("--algos", default=",".join(ALGORITHMS), help="comma-separated (default: all)")
    bench.add_argument(
        "--seeds", default="3", help="a count N (seeds 0..N-1) or a comma-separated list (one seed k: 'k,')"
    )
    bench.add_argument(
        "--reuse-from",
        nargs="+",
        action="append",
        default=[],
        metavar="[REGIME=]RESULTS.json[@ALGOS]",
        help="runs of an earlier bench (its results.json) that stand in for planned runs not finished yet, "
        "matched on regime, algorithm, seed and --quantize; @ALGOS limits it to those algorithms; repeatable",
    )
    bench.add_argument("--out", required=True, help="output folder (finished runs in it are reused)")
    _add_train_options(bench)

    poc = sub.add_parser("poc", help="POC mode on this workstation (one FLARE client per site)")
    poc_sub = poc.add_subparsers(dest="poc_command", required=True)
    for name, text in (
        ("run", "prepare, start, submit, wait, evaluate and stop, in one command"),
        ("prepare", "prepare a POC with one client per site of --data"),
        ("start", "start the prepared POC (server and clients)"),
        ("submit", "submit the job to the running POC, wait and evaluate"),
        ("status", "is the POC running, which clients and jobs"),
        ("stop", "stop the POC (and any process it left behind)"),
        ("clean", "delete the stopped POC's workspace"),
    ):
        p = poc_sub.add_parser(name, help=text)
        p.add_argument("--workspace", default="runs/poc", help="POC folder (default runs/poc)")
        if name in ("run", "prepare", "submit"):
            p.add_argument("--data", required=True, help="data set folder; one client per site")
        if name in ("run", "submit"):
            p.add_argument("--algo", default="lcfed", choices=sorted(ALGORITHMS))
            p.add_argument("--console", action="store_true", help="submit through the admin console (fl_admin.sh)")
            p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job")
            p.add_argument("--job", help="submit this exported job folder (default: export one for --data)")
            _add_train_options(p)
        if name in ("run", "start"):
            p.add_argument(
                "--start-timeout", type=float, default=300.0, help="seconds to wait for every site to connect"
            )
        if name == "run":
            p.add_argument("--keep-running", dest="keep_running", action="store_true", help="do not stop the POC")

    prod = sub.add_parser("prod", help="provisioned startup kits (production)")
    prod_sub = prod.add_subparsers(dest="prod_command", required=True)
    pv = prod_sub.add_parser("provision", help="nvflare provision the project into --out")
    pv.add_argument("--project", default="provisioning/project.yml")
    pv.add_argument("--out", required=True)
    sc = prod_sub.add_parser("site-config", help="write a site kit's local/lcfed_site.json (where its data is)")
    sc.add_argument("--kit", required=True, help="the site's startup kit folder")
    sc.add_argument("--data", required=True, help="the data set folder (dataset.json + this site's folder)")
    sc.add_argument(
        "--models-dir", dest="models_dir", help="where personalized models go (default: <kit>/lcfed_models)"
    )
    dr = prod_sub.add_parser("dry-run", help="provision, start everything on loopback, submit, wait, shut down")
    dr.add_argument("--project", default="provisioning/project.yml")
    dr.add_argument("--data", required=True, help="one data set holding every site's folder")
    dr.add_argument("--job", default="jobs/lcfed", help="exported job folder (default jobs/lcfed)")
    dr.add_argument("--workspace", required=True, help="where the kits are provisioned (a new folder)")
    dr.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job")
    dr.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for every site to connect")

    ev = sub.add_parser("evaluate", help="evaluate the personalized checkpoints of a finished simulator run")
    ev.add_argument("--data", required=True)
    ev.add_argument("--workspace", required=True)

    # predict / export: segment new scans with a site's model, or write it for plain torch (lcfed.ops.predict)
    from lcfed.ops.predict import add_arguments as add_predict_arguments

    add_predict_arguments(sub)
    return parser


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "demo":
        from lcfed.ops.data.demo import build_demo

        build_demo(
            args.out,
            n_sites=args.sites,
            size=args.size,
            seed=args.seed,
            overwrite=args.overwrite,
            regime=args.regime,
        )
        return 0
    if args.data_command == "import":
        from lcfed.ops.data.importers import import_dataset

        info = import_dataset(args.kind, args.src, args.out, size=args.size, seed=args.seed, overwrite=args.overwrite)
        print(f"imported {args.kind} into {args.out}: sites {info.sites}, classes {list(info.labels)}")
        return 0
    from lcfed.ops.federation import site_effect
    from lcfed.runtime.config import make_config

    effect = site_effect(args.data, make_config(args.preset, **_options(args)), args.site)
    print(f"\nplain U-Net trained on {effect['trained_on']} only; test Dice per site:")
    for site, d in effect["test_dice"].items():
        print(f"  {site}: {d:.3f}{'  (own site)' if site == effect['trained_on'] else ''}")
    return 0


def _cmd_job(args: argparse.Namespace) -> int:
    from lcfed.ops.jobs import DEMO_SITES, JobSpec, export_committed_jobs, export_job

    if args.job_command == "export-committed":
        for path in export_committed_jobs(args.out):
            print(f"exported {path}")
        return 0
    if args.job_command == "pack":
        from lcfed.ops.jobs import pack_job

        packed = pack_job(args.job, args.out)
        n = sum(1 for _ in packed.rglob("*.py"))
        print(f"packed {packed}: {n} Python files of lcfed.runtime in app/custom (submitting it needs the BYOC right)")
        return 0
    sites, channels, classes = list(DEMO_SITES), 1, 2
    if args.data:
        from lcfed.runtime.data.layout import load_dataset_info

        info = load_dataset_info(args.data)
        sites, channels, classes = list(info.sites), info.channels, info.n_classes
    if args.sites:
        sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    spec = JobSpec(
        algorithm=args.algo,
        sites=sites,
        preset=args.preset,
        options=_options(args),
        in_channels=args.channels or channels,
        n_classes=args.classes or classes,
        name=args.name,
        weighting=args.weighting,
        min_clients=args.min_clients,
        drop_stale_heads=args.drop_stale_heads,
        round_timeout=args.round_timeout,
        resume=args.resume,
        send_diffs=args.send_diffs,
        exclude_vars=args.exclude_vars,
        percentile_privacy=_percentile_privacy(args.percentile_privacy),
        quantize=args.quantize,
    )
    print(f"exported {export_job(spec, args.out)} (sites {sites})")
    return 0


def _percentile_privacy(value: str | None) -> dict[str, float] | None:
    if not value:
        return None
    try:
        percentile, gamma = (float(v) for v in value.split(","))
    except ValueError:
        raise SystemExit(f"--percentile-privacy wants PERCENTILE,GAMMA (e.g. 10,0.01), not {value!r}") from None
    return {"percentile": percentile, "gamma": gamma}


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from lcfed.ops.evaluation import evaluate_checkpoints, print_table, write_results
    from lcfed.ops.run import simulator_checkpoints
    from lcfed.runtime.data.layout import load_dataset_info

    sites = load_dataset_info(args.data).sites
    job = json.loads((Path(args.workspace) / "simulator.json").read_text())["job_name"]
    ckpts = simulator_checkpoints(Path(args.workspace) / "models", sites, job)
    results = write_results(Path(args.workspace) / "results", evaluate_checkpoints(args.data, ckpts))
    print_table(results)
    return 0


def _cmd_poc(args: argparse.Namespace) -> int:
    from lcfed.ops.poc import PocWorkspace

    poc = PocWorkspace(args.workspace)
    cmd = args.poc_command
    if cmd == "run":
        poc.run(
            args.data,
            args.algo,
            args.preset,
            _options(args),
            args.console,
            args.timeout,
            args.keep_running,
            args.job,
            start_timeout=args.start_timeout,
            quantize=args.quantize,
        )
    elif cmd == "prepare":
        poc.prepare(args.data)
    elif cmd == "start":
        poc.start(args.start_timeout)
    elif cmd == "submit":
        poc.submit_and_report(
            args.data, args.algo, args.preset, _options(args), args.console, args.timeout, args.job, args.quantize
        )
    elif cmd == "status":
        print(poc.status())
    elif cmd == "stop":
        poc.stop()
    elif cmd == "clean":
        poc.clean()
    return 0


def _cmd_prod(args: argparse.Namespace) -> int:
    from lcfed.ops import production

    if args.prod_command == "provision":
        print(f"startup kits in {production.provision(args.project, args.out)}")
    elif args.prod_command == "site-config":
        print(f"wrote {production.write_site_config(args.kit, args.data, args.models_dir)}")
    else:
        from lcfed.ops.run import job_folder_info

        job = job_folder_info(args.job)
        kits = production.provision(args.project, args.workspace)
        for s in job["sites"]:
            production.write_site_config(kits / s, args.data)
        fed = production.Federation(kits, job["sites"], production.project_admin(args.project))
        fed.dry_run(args.job, args.timeout, args.start_timeout)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --verbose may stand anywhere on the line (it applies to every command)
    verbose = "--verbose" in argv
    args = build_parser().parse_args([a for a in argv if a != "--verbose"])
    args.verbose = verbose
    import signal

    # a terminated command still runs its clean-up (a POC or dry run stops the processes it started)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _dispatch(args, argv)
    except KeyboardInterrupt:
        print("interrupted; processes this command started were stopped", file=sys.stderr)
        return 130
    except Exception as e:  # every failure ends in one sentence and what to do; --verbose adds the traceback
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"error: {describe_failure(e)}", file=sys.stderr)
        if not verbose:
            print("(run the same command with --verbose for the details)", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, FileExistsError, FileNotFoundError)) else 1


def describe_failure(e: BaseException) -> str:
    """One line: what went wrong and, where the cause is known, what to do."""
    import subprocess

    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, subprocess.TimeoutExpired):
        return (
            f"`{' '.join(map(str, e.cmd)) if isinstance(e.cmd, (list, tuple)) else e.cmd}` did not finish within "
            f"{e.timeout:.0f} s; the machine may be busy: try again when it is quieter, or give more time "
            "(--start-timeout / --timeout)"
        )
    if isinstance(e, TimeoutError):
        return f"{text} (give more time with --timeout)" if "--" not in text else text
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.filename}: not found"
    if isinstance(e, ModuleNotFoundError):
        return f"{text}: is the environment set up? (bash scripts/setup.sh, then . .venv/bin/activate)"
    if isinstance(e, (ValueError, RuntimeError, OSError, KeyError)):
        return text
    return f"{type(e).__name__}: {text}"


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "data":
        return _cmd_data(args)
    if args.command == "job":
        return _cmd_job(args)
    if args.command == "evaluate":
        return _cmd_evaluate(args)
    if args.command in ("predict", "export"):
        from lcfed.ops.predict import run_command

        return run_command(args)
    if args.command == "poc":
        return _cmd_poc(args)
    if args.command == "prod":
        return _cmd_prod(args)
    if args.command == "bench":
        from lcfed.ops.bench import parse_seeds, run_benchmark

        seeds = parse_seeds(args.seeds)
        algos = [a.strip() for a in args.algos.split(",") if a.strip()]
        command = "python -m lcfed " + " ".join(argv)
        data_sets = [d for group in args.data for d in group]  # --data NAME=DIR ... (repeatable)
        run_benchmark(
            data_sets,
            algos,
            seeds,
            args.out,
            args.preset,
            _options(args),
            command=command,
            quantize=args.quantize,
            reuse_from=[r for group in args.reuse_from for r in group],
        )
        return 0
    if args.command == "run":
        from lcfed.ops.run import run_and_report

        results = run_and_report(
            args.algo,
            args.data,
            args.workspace,
            args.preset,
            _options(args),
            args.parallel,
            args.verbose,
            overwrite=args.overwrite,
            resume=args.resume,
            quantize=args.quantize,
        )
        return 0 if results else 1
    return 1
