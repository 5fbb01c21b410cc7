"""memscan command line. Heavy libraries (torch, ray, open_clip) are imported inside the commands,
so `memscan --help` answers at once."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from scanner import __version__
from scanner.config import NeighboursConfig

EPILOG = """\
examples:
  memscan demo --out runs/demo
      build the embedded demo corpus, train the demo model (both cached in runs/demo), scan, evaluate
  memscan demo --model latent --out runs/demo-latent
      the same with a tiny text-to-image Stable Diffusion trained here: CFG norm at each training caption,
      replications generated from training captions (about 20 minutes from scratch on 2 CPU cores)
  memscan scan --config demo --shards 'runs/demo/corpus/shards/{00000..00005}.tar' --set model.path=runs/demo/model --set classify.calibration_shards=runs/demo/corpus/heldout --out runs/rescan
      geometry scores + neighbours for every image; resumes where a killed run stopped. --config: a YAML
      file, or the name of one shipped with memscan (demo, demo-latent, laion-sd15; copies to edit in
      configs/); --set overrides any config key (section.key=value, e.g. --set geometry.probes=8); the
      held-out shard calibrates the detector's cut to a 1 % false-positive rate
  memscan dedup --shards '/data/laion/{00000..00099}.tar' --out /scans/dedup
      duplicate groups and a removal list before training, no diffusion model needed
  memscan dedup --shards 's3://my-bucket/laion/{00000..00099}.tar' --out s3://my-bucket/scans/dedup
      shards and outputs in object storage (s3://, gs://, http(s)://; credentials from AWS_*, ~/.aws, a role)
  RAY_ADDRESS=HEAD:6379 memscan scan --config laion-sd15 --shards 's3://my-bucket/laion/{00000..00099}.tar' --out s3://my-bucket/scans/sd15
      the driver on a node of an existing Ray cluster; from elsewhere submit a job: ray job submit --address
      http://HEAD:8265 --working-dir . -- python jobs/scan.py --config ... (Ray Client, ray://, cannot run Ray Data)

outputs (under --out): scores/*.parquet, duplicates.parquet, removal_list.parquet/.txt, errors.parquet,
summary.json; read them with pandas.read_parquet or duckdb "select * from 'runs/x/scores/*.parquet'".

exit status: 0 done (bad images are error rows, not failures); 2 bad config, argument or path;
3 incomplete (some shard outputs could not be written; the rest is saved, rerun the same command).
"""


def _setup_logging(verbose: bool) -> None:
    """memscan's own log lines at INFO (DEBUG with -v); other libraries' (open_clip, faiss, diffusers, Ray Data) at
    WARNING (INFO with -v: their DEBUG, PIL's chunk lists and matplotlib's font scoring, would bury memscan's),
    each line named by its logger."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("memscan").setLevel(logging.DEBUG if verbose else logging.INFO)


def _add_common(p: argparse.ArgumentParser, progress: bool = False) -> None:
    """-v, and --no-progress for the commands that draw a progress bar (the others have none to turn off)."""
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in CI logs)")


SHARDS_HELP = ("directory, glob or brace pattern of .tar shards, local or s3:// gs:// http(s):// (credentials from "
               "AWS_* / ~/.aws), an fsspec chain (simplecache::s3://...) or 'pipe:CMD'")


def _add_prior(p: argparse.ArgumentParser, reference: bool = False) -> None:
    p.add_argument("--against", action="append", default=[], metavar="OLD_OUT",
                   help="a finished scan's --out (repeatable): only the new --shards are read, embedded and scored; "
                        "their duplicate groups take in the old images (kept over new ones), LID* its neighbours, "
                        "the cut is the old scan's; the removal list names new images only (incremental.against)")
    p.add_argument("--remove-old", action="store_true",
                   help="with --against: also list old images that the new groups drop "
                        "(needs --set incremental.keep_old=false)")
    if reference:
        p.add_argument("--reference", action="append", default=[], metavar="SHARDS_OR_OUT",
                       help="a reference set (repeatable): shards, or a finished scan's --out (an evaluation set, an "
                            "opt-out list); every image in a duplicate group with one of its images is removed with "
                            "reason `reference`; reference images are never removed nor scored")


def _prior_args(cfg, args) -> None:
    """--against / --reference / --remove-old onto incremental.*."""
    inc = cfg.incremental
    inc.against = list(inc.against) + list(getattr(args, "against", []) or [])
    inc.reference = list(inc.reference) + list(getattr(args, "reference", []) or [])
    if getattr(args, "remove_old", False):
        inc.remove_old = True
    inc.validate()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memscan", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Find duplicated and memorized images in diffusion-model training data (webdataset shards).")
    parser.add_argument("--version", action="version", version=f"memscan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("scan", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="score every image under the diffusion model, find neighbours, write reports",
                       description="The main job. Streams shards through Ray Data (local Ray, or the cluster at "
                                   "$RAY_ADDRESS), scores each image (FLIPD, p-Laplace, score norm, CFG norm, "
                                   "optionally NB), finds duplicates, classifies OD-/DD-Mem and writes a removal "
                                   "list. Rerunning into the same --out skips finished shards.",
                       epilog="example:\n  memscan scan --config demo --shards 'd/{00000..00009}.tar' "
                              "--set geometry.probes=16 --out runs/x")
    p.add_argument("--config", required=True,
                   help="YAML config file, or a config shipped with memscan by name (demo, demo-latent, laion-sd15; "
                        "configs/ in the repository has them with every key commented)")
    p.add_argument("--shards", nargs="+", help=f"{SHARDS_HELP}; overrides data.shards")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set geometry.t0=0.2 (repeatable)")
    p.add_argument("--out", help="output directory (overrides `out` in the config)")
    _add_prior(p)
    _add_common(p, progress=True)

    p = sub.add_parser("dedup", help="duplicate groups and removal list only (no diffusion model)",
                       description="Embeds every image (open_clip), finds duplicate groups by bytes, perceptual hash "
                                   "and cosine >= --threshold (and candidates below it whose thumbnails align), keeps "
                                   "one per group. Without --clip-checkpoint it uses the copy-detection embedder "
                                   "shipped with memscan, or with --train-embedder trains one on the corpus (cached "
                                   "in --out).")
    p.add_argument("--shards", nargs="+", required=True, help=SHARDS_HELP)
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, help="cosine at or above which images are duplicates (default "
                                                   f"{NeighboursConfig.dup_threshold}: neighbours.dup_threshold)")
    p.add_argument("--clip-model", help="open_clip architecture name")
    p.add_argument("--clip-checkpoint", help="local open_clip checkpoint (safetensors)")
    p.add_argument("--train-embedder", action="store_true",
                   help="train the copy-detection embedder on this corpus instead of using the shipped one")
    p.add_argument("--train-steps", type=int,
                   help="copy-detection embedder training steps with --train-embedder (default 600)")
    p.add_argument("--config", help="optional YAML config; its neighbours section is used")
    _add_prior(p, reference=True)
    _add_common(p, progress=True)

    p = sub.add_parser("train-embedder", help="train the self-supervised copy-detection embedder on a corpus")
    p.add_argument("--shards", nargs="+", required=True, help=SHARDS_HELP)
    p.add_argument("--out", required=True, help="directory for the open_clip checkpoint")
    p.add_argument("--steps", type=int, help="training steps (default: neighbours.train_steps, 600)")
    p.add_argument("--config", help="optional YAML config; its neighbours section is used")
    _add_common(p)

    p = sub.add_parser("build-demo-corpus", help="write the embedded demo corpus (shards + truth.parquet)")
    p.add_argument("--out", required=True)
    p.add_argument("--n-unique", type=int, default=2000)
    p.add_argument("--n-heldout", type=int, default=2000,
                   help="images the model will never train on, in heldout/ (classify.calibration_shards); default "
                        "2000: a 1 %% cut from them applies a false-positive rate in 0.61-1.54 %% (95 %%)")
    p.add_argument("--seed", type=int, default=0)
    _add_common(p)

    p = sub.add_parser("train-demo", help="train the demo diffusion model on the demo corpus (save_pretrained)")
    p.add_argument("--out", required=True, help="directory holding corpus/ (built if missing); model goes to model/")
    p.add_argument("--steps", type=int, help="seeded optimizer steps (default 3700: ~10 minutes on 2 cores)")
    p.add_argument("--minutes", type=float, help="optional cap: stop earlier, with a warning (a different model)")
    p.add_argument("--seed", type=int, default=0, help="corpus (when built here) and training seed")
    p.add_argument("--kind", choices=["pixel", "latent"], default="pixel",
                   help="pixel: the unconditional 16 px UNet; latent: a tiny text-to-image Stable Diffusion (VAE, "
                        "CLIP text encoder, cross-attention UNet) in an SD checkout's layout, on a corpus whose "
                        "captions are unique except for the verbatim repeated groups")
    _add_common(p, progress=True)

    p = sub.add_parser("demo", help="corpus -> demo model -> scan -> evaluate, all on the embedded demo data",
                       description="Builds the demo corpus and trains the demo model if --out lacks them (cached), "
                                   "runs the full scan, evaluates against the planted truth, prints the metrics.")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0,
                   help="demo seed: other base images in the corpus and another model (0: the seed every shipped "
                        "threshold was chosen on; 1-3: held-out)")
    p.add_argument("--steps", type=int, help="demo model training steps, first run only (default 3700: ~10 minutes "
                                             "on 2 cores; fixed steps, so every machine trains the same model)")
    p.add_argument("--minutes", type=float,
                   help="optional training time cap, first run only: stops early with a warning (a different model)")
    p.add_argument("--model", dest="kind", choices=["pixel", "latent"], default="pixel",
                   help="pixel (default): the unconditional 16 px UNet; latent: a tiny text-to-image Stable Diffusion "
                        "trained here (~20 minutes from scratch on 2 cores), scanned as model.kind latent with the "
                        "CFG norm at each training caption (configs/demo-latent.yaml)")
    p.add_argument("--dose", action="store_true",
                   help="plant 4 more groups at each of 2, 4, 8, 16 and 32 copies: metrics.json and the report then "
                        "show the flagged share against the number of copies (dose-response; use a fresh --out)")
    p.add_argument("--quick", action="store_true",
                   help="a 140-sample corpus and a few training steps: every command and output in a few minutes, "
                        "metrics meaningless (use a fresh --out: a cached full-size corpus or model is reused)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one key of the demo config, e.g. --set geometry.probes=8 (repeatable)")
    _add_common(p, progress=True)

    p = sub.add_parser("evaluate", help="AUROC / TPR@1%%FPR of every score column against planted truth",
                       description="Writes metrics.json into --out: AUROC, intervals and TPR at 1 %% and 0.1 %% FPR "
                                   "of every score column (a scan), and duplicate pair / removal precision and "
                                   "recall per planted kind and edit (a scan or a `memscan dedup` folder).")
    p.add_argument("--out", required=True, help="a finished scan's or dedup's output directory")
    p.add_argument("--truth", required=True, help="truth.parquet (key, group_id, planted, copies)")
    _add_common(p)

    p = sub.add_parser("report", help="(re)write report.html from a finished scan's outputs",
                       epilog="example:\n  memscan report --out runs/demo/scan --truth runs/demo/corpus/truth.parquet",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a finished scan's output directory")
    p.add_argument("--truth", help="optional truth.parquet: split the plots by planted class")
    _add_common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    _setup_logging(args.verbose)
    from scanner.errors import MemscanError, ScanIncomplete

    try:
        return COMMANDS[args.command](args)
    except MemscanError as e:  # the user's to fix (exit 2), or incomplete (exit 3: what is done is saved)
        what = "incomplete" if isinstance(e, ScanIncomplete) else "error"
        print(f"memscan {args.command}: {what}: {e}", file=sys.stderr)
        return e.exit_code
    except (FileNotFoundError, PermissionError) as e:  # a path the operating system refused
        print(f"memscan {args.command}: error: {e}", file=sys.stderr)
        return 2


def _writable_out(out: str) -> str:
    """--out checked before anything starts: a local directory or an object-storage URL memscan can write
    (scanner.storage.Out raises ConfigError naming any other scheme: exit 2)."""
    from scanner.storage import Out

    return Out(out).uri()


def _local_out(out: str, command: str) -> Path:
    """--out of a command that writes local files (a model with save_pretrained, a corpus, a checkpoint)."""
    from scanner.errors import ConfigError
    from scanner.storage import is_url, scheme

    if is_url(out):
        raise ConfigError(f"memscan {command} --out {out!r}: {command} writes a local folder, not {scheme(out)}://; "
                          "give a local directory (scan, dedup, evaluate and report take object-storage URLs)")
    return Path(out)


def cmd_scan(args) -> int:
    from scanner.config import load_config

    overrides = list(args.overrides)
    cfg = load_config(args.config, overrides)
    if args.shards:
        cfg.data.shards = list(args.shards)
    _prior_args(cfg, args)
    out = args.out or cfg.out
    if not out:
        from scanner.config import ConfigError

        raise ConfigError("no output directory: pass --out DIR or set `out` in the config")
    out = _writable_out(out)
    from scanner.pipeline import run_scan

    summary = run_scan(cfg, out, progress=not args.no_progress)
    c = summary["counts"]
    print(f"memscan scan: {c['seen']} samples, {c['scored']} scored, {c['errors']} errors, "
          f"{c['removed']} on the removal list; results in {out}")
    return 0


def _neighbours_scan_cfg(args):
    """The config of `dedup` / `train-embedder`: --config's data, neighbours and ray sections (checked), the
    flags on top, and no diffusion model."""
    from scanner.config import NEIGHBOUR_SECTIONS, load_config

    cfg = load_config(getattr(args, "config", None), sections=NEIGHBOUR_SECTIONS)
    n = cfg.neighbours
    if getattr(args, "threshold", None) is not None:
        n.dup_threshold = args.threshold
    if getattr(args, "clip_model", None):
        n.clip_model = args.clip_model
    if getattr(args, "clip_checkpoint", None):
        n.clip_checkpoint = args.clip_checkpoint
    if getattr(args, "train_steps", None):
        n.train_steps = args.train_steps
    if getattr(args, "train_embedder", False):
        n.train_embedder = True
    n.validate()
    cfg.model.kind, cfg.model.path = "none", None
    cfg.neighbours.enabled = True
    cfg.data.shards = list(args.shards)
    _prior_args(cfg, args)
    return cfg


def cmd_dedup(args) -> int:
    out = _writable_out(args.out)
    from scanner.pipeline import run_scan

    summary = run_scan(_neighbours_scan_cfg(args), out, progress=not args.no_progress, label="dedup")
    c = summary["counts"]
    print(f"memscan dedup: {c['seen']} samples, {c['duplicate_groups']} duplicate groups, {c['errors']} errors, "
          f"{c['removed']} to remove; results in {out}")
    return 0


def cmd_train_embedder(args) -> int:
    from scanner.neighbours.train_embedder import train_embedder

    log = logging.getLogger("memscan")
    from scanner.preflight import check_neighbours

    cfg = check_neighbours(_neighbours_scan_cfg(args).neighbours)
    path = train_embedder(args.shards, _local_out(args.out, "train-embedder"), cfg, steps=args.steps, log=log.info)
    print(f"memscan train-embedder: checkpoint in {path}")
    return 0


def cmd_build_demo_corpus(args) -> int:
    from scanner.demo.corpus import build_demo_corpus

    corpus = build_demo_corpus(_local_out(args.out, "build-demo-corpus"), n_unique=args.n_unique, seed=args.seed,
                               n_heldout=args.n_heldout)
    print(f"memscan build-demo-corpus: {corpus}")
    return 0


def cmd_train_demo(args) -> int:
    from scanner.demo.run import ensure_demo_model

    path = ensure_demo_model(_local_out(args.out, "train-demo"), minutes=args.minutes, seed=args.seed, steps=args.steps,
                             progress=not args.no_progress, kind=args.kind, quick=None)  # any cached corpus
    print(f"memscan train-demo: model in {path}")
    return 0


def cmd_demo(args) -> int:
    from scanner.demo.run import run_demo

    return run_demo(_local_out(args.out, "demo"), minutes=args.minutes, overrides=args.overrides, progress=not args.no_progress,
                    quick=args.quick, seed=args.seed, steps=args.steps, dose=args.dose, kind=args.kind)


def cmd_evaluate(args) -> int:
    from scanner.demo.evaluate import evaluate, format_metrics

    metrics = evaluate(_writable_out(args.out), Path(args.truth))
    print(format_metrics(metrics))
    from scanner.storage import Out

    print(f"memscan evaluate: metrics in {Out(args.out).uri('metrics.json')}")
    return 0


def cmd_report(args) -> int:
    from scanner.report import write_report

    path = write_report(_writable_out(args.out), Path(args.truth) if args.truth else None)
    print(f"memscan report: {path}")
    return 0


COMMANDS = {"report": cmd_report, "scan": cmd_scan, "dedup": cmd_dedup, "train-embedder": cmd_train_embedder,
            "build-demo-corpus": cmd_build_demo_corpus, "train-demo": cmd_train_demo, "demo": cmd_demo,
            "evaluate": cmd_evaluate}


if __name__ == "__main__":
    sys.exit(main())
