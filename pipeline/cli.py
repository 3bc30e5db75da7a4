"""Command line: `vaepipe prepare | fit | eval | sample | config` (also `python -m pipeline`)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config, to_yaml
from pipeline import signals
from pipeline.errors import (EXIT_RETRYABLE, ResumeError, RunFolderBusy, ShardError, TrainingDiverged,
                             UnsafeCheckpointError, WriteFailure)
from pipeline.data.sources import SOURCE_NAMES

EXAMPLES = """examples:
  vaepipe fit                                        # default: VAE on procedural sprites
  vaepipe fit -c configs/vae_mnist.yaml data.source=../shared/data/mnist trainer.max_epochs=5
  vaepipe eval runs/vae_mnist/checkpoints/last.ckpt --k 5000
  vaepipe sample runs/vae_sprites/checkpoints/last.ckpt --out samples.png
"""


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", action="append", default=[], metavar="FILE",
                   help="YAML config file; repeat to merge several in order")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides, e.g. model.beta=4")


def _at_least(low: int):
    """An argparse type: an integer >= low (argparse then prints the option and the value)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _sizes(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes wants e.g. train=1000,val=100,test=100, got {text!r}") from None


def _box(text: str) -> tuple[int, int, int, int]:
    try:
        box = tuple(int(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not (0 <= box[0] < box[2] and 0 <= box[1] < box[3]):
        raise argparse.ArgumentTypeError(f"--crop wants x0,y0,x1,y1 with x0 < x1 and y0 < y1, got {text!r}")
    return box


def _array_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--trials", type=int, required=True, help="number of trials (array tasks)")
    q.add_argument("--parallel", type=int, help="at most this many trials at once (array %%P)")
    _config_args(q)
    q.add_argument("--partition")
    q.add_argument("--time", help="walltime per trial, e.g. 04:00:00")
    q.add_argument("--account")
    q.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaepipe", description="Train and evaluate VAE-family models.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="write WebDataset shards + manifest.json for a data set")
    p.add_argument("name", choices=SOURCE_NAMES)
    p.add_argument("--out", required=True, help="output folder (shards and manifest.json)")
    p.add_argument("--source", help="raw input: mnist idx folder, binarized-mnist/npz .npz, frey .npy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", type=_sizes, help="split sizes for generated sources, e.g. train=1000,val=100,test=100")
    p.add_argument("--shard-bytes", type=int, default=64_000_000, help="start a new shard after this many bytes")
    p.add_argument("--shard-samples", type=int, default=0, help="... or after this many samples (0: no limit)")
    p.add_argument("--force", action="store_true", help="rebuild even if a manifest exists, or write beside files vaepipe "
                   "did not write (removes only the files its own manifest names; never overwrites others)")
    p.add_argument("--verify", action="store_true", help="only check existing shards against the manifest")
    g = p.add_argument_group("images (a folder, glob, .zip or .tar of JPEG/PNG/WebP/BMP/TIFF files; docs/data.md)")
    g.add_argument("--size", type=_at_least(1), help="resize the shorter side to S, centre-crop S x S")
    g.add_argument("--crop", type=_box, help="x0,y0,x1,y1: crop this box first (CelebA-64: 15,40,163,188)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1: grey, 3: RGB (default)")
    g.add_argument("--val", type=_at_least(0), help="validation images held out by --seed (default: a tenth; "
                   "with train/ and test/ folders, a tenth of train/, at most 5000)")
    g.add_argument("--test", type=_at_least(0), help="test images held out by --seed (default: a tenth)")
    g.add_argument("--workers", type=_at_least(0), default=0, help="decoding processes (the shards are the same "
                   "for any number)")
    g.add_argument("--on-error", choices=("skip", "stop"), default="skip",
                   help="an unreadable image: skipped, counted and named (default), or stop")

    p = sub.add_parser("index", help="describe standard WebDataset shards (webdataset, img2dataset) as they are, "
                                     "with a manifest written elsewhere (docs/data.md)")
    p.add_argument("shards", help="a folder (train-*, val-*, test-* shards split by name), a brace pattern "
                   "(data/{00000..00009}.tar), an http(s) URL pattern, or a pipe: command with {name}")
    p.add_argument("--out", required=True, help="folder for manifest.json (the shards are never written to)")
    p.add_argument("--val", help="validation shards (default: a folder's val-* shards, else the last train shard)")
    p.add_argument("--test", help="test shards (default: a folder's test-* shards, else none)")
    p.add_argument("--names", help="with a pipe: command, the shard names as a brace pattern")
    p.add_argument("--val-names", help="with a pipe: --val, its shard names")
    p.add_argument("--test-names", help="with a pipe: --test, its shard names")
    p.add_argument("--size", type=_at_least(1), help="resize the shorter side to S, centre-crop S x S (in the loader)")
    p.add_argument("--crop", type=_box, help="x0,y0,x1,y1: crop this box first")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3)
    p.add_argument("--on-error", choices=("skip", "stop"), default="skip",
                   help="a record without a readable image: left out and named (default), or stop")
    p.add_argument("--force", action="store_true", help="replace an existing manifest in --out")

    p = sub.add_parser("fit", help="train a model (prepares missing shards first)")
    _config_args(p)

    p = sub.add_parser("submit", help="render the Slurm script for a training run and sbatch it")
    _config_args(p)
    p.add_argument("--nodes", type=int, help="must equal trainer.num_nodes")
    p.add_argument("--gpus-per-node", type=int, help="must equal trainer.devices (0: CPU job)")
    p.add_argument("--partition")
    p.add_argument("--time", help="walltime, e.g. 04:00:00; the job requeues itself before it runs out")
    p.add_argument("--account")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")

    p = sub.add_parser("sweep", help="hyperparameter sweeps: wandb server + Slurm array, or local (docs/sweeps.md)")
    sweep = p.add_subparsers(dest="sweep_command", required=True)
    q = sweep.add_parser("create", help="register a sweep YAML with the wandb server; prints its id")
    q.add_argument("file")
    q.add_argument("--project", help="wandb project (default: logger.project, vaepipe)")
    q.add_argument("--entity", help="wandb entity (default: your API key's)")
    q = sweep.add_parser("submit", help="a Slurm job array of `wandb agent --count 1`, one trial per task")
    q.add_argument("sweep_id", help="ENTITY/PROJECT/ID as `sweep create` printed it")
    _array_args(q)
    q = sweep.add_parser("local", help="run a grid/random/bayes sweep (and its early_terminate) without a wandb "
                                       "server: an Optuna study in the sweep folder; results table and picture")
    q.add_argument("file")
    q.add_argument("--trials", type=int, help="number of trials (grid: the first N points; random, bayes: default 10)")
    q.add_argument("--seed", type=int, default=0, help="seed of the random draws and of the bayes sampler")
    q.add_argument("--out", help="sweep folder (default runs/sweeps/<file stem>)")
    q.add_argument("--slurm", action="store_true", help="submit the trials as a Slurm job array instead")
    q.add_argument("--parallel", type=int, help="with --slurm: at most this many trials at once")
    q.add_argument("-c", "--config", action="append", default=[], metavar="FILE",
                   help="with --slurm: config with the slurm.* site settings and trainer devices/nodes")
    q.add_argument("--dry-run", action="store_true", help="with --slurm: print the script, submit nothing")
    q.add_argument("overrides", nargs="*", metavar="key=value",
                   help="added to every trial's command (e.g. trainer.max_epochs=3); slurm.* keys go to the job")
    q = sweep.add_parser("results", help="the results table of a local sweep folder")
    q.add_argument("dir")
    q = sweep.add_parser("trial", help="(internal) one trial of a local sweep: what each Slurm array task runs")
    q.add_argument("dir")
    q.add_argument("index", type=int)

    p = sub.add_parser("diagnose", help="gradient-estimator variance; amortisation gap (docs/estimators.md)")
    diag = p.add_subparsers(dest="diagnose_command", required=True)
    q = diag.add_parser("gradients", help="per-parameter gradient variance of each estimator on one batch")
    q.add_argument("ckpt", help="checkpoint file or run folder")
    q.add_argument("--samples", type=_at_least(2), default=50, help="gradient draws per estimator")
    q.add_argument("--batch-size", type=_at_least(1), default=100)
    q.add_argument("--split", default="train", choices=("train", "val", "test"))
    q.add_argument("--objective", choices=("elbo", "iwae"), help="default: the model's")
    q.add_argument("--k", type=_at_least(1), help="samples per example (default: the model's model.k)")
    q.add_argument("--data-root")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true", help="one JSON object, per parameter tensor")
    q = diag.add_parser("amortization", help="approximation and amortisation gaps (Concept 11.10), in nats")
    q.add_argument("ckpt", help="checkpoint file or run folder")
    q.add_argument("--limit", type=_at_least(1), default=1000, help="N examples drawn at random (--seed) from the split")
    q.add_argument("--split", default="test", choices=("train", "val", "test"))
    q.add_argument("--steps", type=_at_least(0), default=200, help="Adam steps per example for q_i")
    q.add_argument("--lr", type=float, default=1e-2)
    q.add_argument("--k", type=_at_least(1), default=1000, help="importance samples for log p(x)")
    q.add_argument("--batch-size", type=_at_least(1), default=100)
    q.add_argument("--data-root")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true")

    p = sub.add_parser("config", help="print the resolved config")
    _config_args(p)

    p = sub.add_parser("eval", help="ELBO, IWAE bound and importance-sampled -log p(x) on a split")
    p.add_argument("ckpt", help="checkpoint file or run folder")
    p.add_argument("--k", type=_at_least(1), default=5000, help="importance samples per example (default 5000)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--limit", type=_at_least(1), help="only N examples, drawn at random (--seed) from the split")
    p.add_argument("--batch-size", type=_at_least(1), default=100)
    p.add_argument("--chunk", type=_at_least(1), help="samples per pass (bounds memory; default: 5000/batch on CPU, "
                   "500 on GPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the log-weights (default: on from examples x K >= 5 million; ~5-20 s once)")
    p.add_argument("--data-root", help="shards folder (default: the one in the checkpoint's config)")
    p.add_argument("--shards", help="where shards indexed by `vaepipe index` are, as data.shards in fit (a pipe: "
                   "command is run only when given here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("sample", help="PNG grids of prior samples and reconstructions")
    p.add_argument("ckpt", help="checkpoint file or run folder")
    p.add_argument("--out", required=True, help="samples PNG; reconstructions go to <stem>_recon.png")
    p.add_argument("--n", type=_at_least(1), default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", help="shards folder for the reconstructions")
    p.add_argument("--pixels", choices=("mean", "draw"), default="mean",
                   help="show the mean of p(x|z) (default: smooth, what training's grids show) or a draw of x ~ "
                        "p(x|z) (the pixels' own noise: 8-bit values for the discretised likelihoods)")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        from pipeline.data.shards import prepare, verify  # noqa: I001

        if args.verify:
            problems = verify(args.out)
            print("\n".join(problems) if problems else f"{args.out}: all shards match the manifest")
            return 1 if problems else 0
        images = {"size": args.size, "crop": args.crop, "channels": args.channels, "val": args.val, "test": args.test,
                  "workers": args.workers, "on_error": args.on_error} if args.name == "images" else None
        prepare(args.name, args.out, source=args.source, seed=args.seed, sizes=args.sizes,
                shard_bytes=args.shard_bytes, shard_samples=args.shard_samples, force=args.force, images=images)
    elif args.command == "index":
        from braceexpand import braceexpand

        from pipeline.data.image_source import ImageOptions
        from pipeline.data.index import index

        opts = ImageOptions(size=args.size, crop=args.crop, channels=args.channels, on_error=args.on_error)
        index(args.shards, args.out, val=args.val, test=args.test, opts=opts, force=args.force,
              names=list(braceexpand(args.names)) if args.names else None,
              val_names=list(braceexpand(args.val_names)) if args.val_names else None,
              test_names=list(braceexpand(args.test_names)) if args.test_names else None)
    elif args.command == "submit":
        from pipeline.launch.slurm import submit

        cfg = load_config(args.config, args.overrides)
        script, job = submit(cfg, dry_run=args.dry_run, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                             partition=args.partition, time=args.time, account=args.account)
        if args.dry_run:
            print(job, end="")
        else:
            print(f"submitted job {job}: script {script}, log {Path(cfg.run.dir) / f'slurm-{job}.out'}")
    elif args.command == "diagnose":
        from pipeline import diagnose

        if args.diagnose_command == "gradients":
            r = diagnose.gradient_variance(args.ckpt, samples=args.samples, batch_size=args.batch_size, split=args.split,
                                           objective=args.objective, k=args.k, data_root=args.data_root, seed=args.seed)
            print(json.dumps(r) if args.json else diagnose.format_gradient_report(r))
        else:
            r = diagnose.amortization_gap(args.ckpt, limit=args.limit, split=args.split, steps=args.steps, lr=args.lr,
                                          k=args.k, batch_size=args.batch_size, data_root=args.data_root,
                                          seed=args.seed, progress=not args.json)
            print(json.dumps(r) if args.json else diagnose.format_amortization_report(r))
    elif args.command == "sweep":
        return run_sweep(args)
    elif args.command == "config":
        print(to_yaml(load_config(args.config, args.overrides)), end="")
    elif args.command == "fit":
        from pipeline.train import EXIT_PREEMPTED, fit

        if fit(load_config(args.config, args.overrides))["preempted_at"] is not None:
            return EXIT_PREEMPTED
    elif args.command == "eval":
        from pipeline.evaluate import evaluate

        r = evaluate(args.ckpt, k=args.k, split=args.split, limit=args.limit, batch_size=args.batch_size,
                     chunk=args.chunk, data_root=args.data_root, seed=args.seed, progress=not args.json,
                     device=args.device, compile=args.compile, shards=args.shards)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['split']}: {r['examples']} examples, K={r['k']}, {r['seconds']:.1f} s (nats per example)")
            for key, value in r.items():
                if key.startswith(("elbo", "iwae", "nll")):
                    print(f"  {key:20s} {value:10.3f}")
            if r.get("bpd") is not None:
                print(f"bits/dim (-log p(x) / (D ln 2), D = {r['dims']}): {r['bpd']:.4f} +- {r['bpd_stderr']:.4f} "
                      f"from L_{r['k']}; {r['bpd_elbo']:.4f} from the ELBO")
            elif "bpd_note" in r:
                print(f"bits/dim: {r['bpd_note']}")
            if "mig" in r:
                print(f"disentanglement (ground-truth factors): MIG {r['mig']:.3f}, beta-VAE metric "
                      f"{r['beta_vae_score']:.3f} (chance: 1 / number of factors)")
    elif args.command == "sample":
        from pipeline.evaluate import sample

        for path in sample(args.ckpt, args.out, n=args.n, seed=args.seed, data_root=args.data_root,
                           pixels=args.pixels):
            print(path)
    return 0


def _array_range(trials: int, parallel: int | None) -> str:
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    if parallel is not None and parallel < 1:  # %0 is no limit to some Slurm versions, refused by others
        raise ValueError(f"--parallel must be >= 1, got {parallel}")
    return f"0-{trials - 1}" + (f"%{parallel}" if parallel else "")


def _slurm_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(job settings, trial overrides): slurm.* sizes the job only; trainer.devices/num_nodes size
    both the job and every trial; the rest goes to every trial."""
    job = [o for o in overrides if o.startswith(("slurm.", "trainer.devices=", "trainer.num_nodes="))]
    return job, [o for o in overrides if not o.startswith("slurm.")]


def run_sweep(args: argparse.Namespace) -> int:
    from pipeline.launch import sweep as sw

    cmd = args.sweep_command
    if cmd == "create":
        from pipeline.tracking import resolve_wandb_mode

        spec = sw.load_sweep(args.file, local=False)
        mode, why = resolve_wandb_mode("online")
        if mode != "online":
            raise ValueError(f"`sweep create` needs the wandb server: {why}. Without one, run the same file "
                             f"with `vaepipe sweep local {args.file}`")
        import wandb

        project = args.project or load_config().logger.project
        sweep_id = wandb.sweep(spec, project=project, entity=args.entity)
        entity = args.entity or wandb.Api().default_entity
        full = f"{entity}/{project}/{sweep_id}"
        print(f"created sweep {full}\nnext: vaepipe sweep submit {full} --trials 20 --parallel 4 "
              f"[-c site.yaml] [--partition P --time HH:MM:SS]")
    elif cmd == "submit":
        folder = sw.sweep_folder(args.sweep_id)
        cfg = load_config(args.config, [*args.overrides, sw.dotlist_item("run.dir", str(folder)), "run.name=sweep"])
        agent = f"{shlex.quote(sys.executable)} -m wandb agent --forward-signals --count 1 {shlex.quote(args.sweep_id)}"
        script, job = sw.submit_array(cfg, template="sweep_array.sbatch", array=_array_range(args.trials, args.parallel),
                                      name=args.sweep_id.split("/")[-1], extra={"trial_command": agent},
                                      dry_run=args.dry_run, partition=args.partition, time=args.time,
                                      account=args.account)
        print(job if args.dry_run else f"submitted job array {job} ({args.trials} trials of sweep {args.sweep_id}): "
              f"script {script}, logs {folder}/slurm-{job}_*.out", end="\n" if not args.dry_run else "")
    elif cmd == "local":
        out = Path(args.out or Path("runs") / "sweeps" / Path(args.file).stem)
        job_settings, trial_overrides = _slurm_overrides(args.overrides)
        if not args.slurm:
            # options that only shape the job array would be ignored (--dry-run would run every trial)
            job_only = [name for name, value in (("--dry-run", args.dry_run), ("--parallel", args.parallel is not None),
                                                 ("-c/--config", args.config)) if value]
            job_only += [o for o in args.overrides if o.startswith("slurm.")]
            if job_only:
                raise ValueError(f"{', '.join(job_only)}: only with --slurm (they shape the job array); add --slurm, "
                                 "or leave them out to run the trials here one after the other")
            rows = sw.run_local(args.file, out, args.trials, args.seed, trial_overrides)
            print(f"\n{sw.format_table(rows)}\n\nresults: {out / 'results.csv'}, {out / 'results.md'}, "
                  f"{out / 'results.png'}")
            from pipeline.launch.plots import publish_to_wandb

            publish_to_wandb(out, rows, sw.read_plan(out)["sweep"])
            return 0 if all(r["status"] in ("done", "pruned") for r in rows) else 1
        # the job first: a size it cannot have is refused before the plan is written
        cfg = load_config(args.config, [*job_settings, sw.dotlist_item("run.dir", str(out)), "run.name=sweep"])
        sw.job_size(cfg)
        _array_range(1, args.parallel)
        plan = sw.plan_local(args.file, out, args.trials, args.seed, trial_overrides)
        runner = f"{shlex.quote(sys.executable)} -m pipeline sweep trial {shlex.quote(str(out.resolve()))} $SLURM_ARRAY_TASK_ID"
        script, job = sw.submit_array(cfg, template="sweep_array.sbatch", name=plan["sweep"], dry_run=args.dry_run,
                                      array=_array_range(len(plan["trials"]), args.parallel),
                                      extra={"trial_command": runner})
        print(job if args.dry_run else f"submitted job array {job} ({len(plan['trials'])} trials): script {script}; "
              f"when done: vaepipe sweep results {out}", end="\n" if not args.dry_run else "")
    elif cmd == "results":
        from pipeline.launch.plots import publish_to_wandb

        rows = sw.results(args.dir)
        print(sw.format_table(rows))
        publish_to_wandb(Path(args.dir), rows, sw.read_plan(args.dir)["sweep"])
    elif cmd == "trial":
        return sw.run_trial(args.dir, args.index)
    return 0


def relaunch_under_srun() -> None:
    """A multi-process sweep trial: the agent started `vaepipe fit` once; srun starts it once per
    task (VAEPIPE_TRIAL_SRUN, set by slurm/sweep_array.sbatch), in place of this process."""
    launcher = os.environ.pop("VAEPIPE_TRIAL_SRUN", "")
    if launcher:
        argv = [*shlex.split(launcher), sys.executable, "-m", "pipeline", *sys.argv[1:]]
        os.execvp(argv[0], argv)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    # key=value overrides may stand anywhere, also after options (`submit --nodes 2 trainer.num_nodes=2`)
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(t.startswith("-") or "=" not in t for t in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command == "fit":
        trial = shlex.split(os.environ.pop("VAEPIPE_TRIAL_OVERRIDES", ""))
        if trial:  # a sweep trial of a Slurm array: the job's size (pipeline.launch.sweep.submit_array)
            args.overrides = [*args.overrides, *trial]
            sys.argv = [*sys.argv, *trial]  # and so to the srun relaunch
        relaunch_under_srun()
        signals.install()  # before torch is even imported (see pipeline/signals.py)
    try:
        sys.exit(run(args))
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, ShardError, ResumeError,
            TrainingDiverged, UnsafeCheckpointError, RunFolderBusy) as err:
        print(f"vaepipe {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except WriteFailure as err:  # disk full and the like: retryable once space is freed
        print(f"vaepipe {args.command}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_RETRYABLE)
    except (NotADirectoryError, IsADirectoryError, PermissionError) as err:  # a path that cannot be one
        print(f"vaepipe {args.command}: error: {err.strerror or err}: {err.filename or ''}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        # Lightning's refusal of a setting (its message names it); matched by name so that the CLI
        # does not import Lightning (and torch) before it must.
        if type(err).__name__ != "MisconfigurationException":
            raise
        print(f"vaepipe {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
