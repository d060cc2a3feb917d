"""`mmcl`: the command line. Each subcommand parses, then calls one library function.

Heavy imports (torch, ray) happen inside the handlers, so `mmcl --help` is instant. Errors a
user can cause end in one line on stderr and exit code 2; nothing else is printed.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_USER_ERROR = 2
MAX_ERROR_CHARS = 2000  # an error message longer than this is cut: a user reads it, not a log


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="run config YAML (default: built-in defaults; see "
                   "configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.batch_size=512 (repeatable)")


def _add_s3_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// paths (MinIO, "
                   "Ceph, ...; default: $AWS_ENDPOINT_URL, else AWS). Credentials come from "
                   "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile/role, never a flag")
    p.add_argument("--region", help="S3 region (default: $AWS_REGION)")


def _s3(args) -> dict:
    return {"endpoint_url": args.endpoint_url, "region": args.region}


def _load_config(args):
    from mmcl import config

    return config.load(args.config, args.overrides)


# ------------------------------------------------------------------------------ handlers

def cmd_config(args) -> int:
    from mmcl import config

    cfg = _load_config(args)
    print(config.dump(cfg), end="")
    # A YAML comment, so the output still loads: which data a run of this config reads.
    print(f"# data: {cfg.data.path} (data.path); data.synth is not used" if cfg.data.path
          else f"# data: the built-in {cfg.data.synth.preset!r} set (data.synth), since "
          "data.path is not set")
    return 0


def cmd_data_convert(args) -> int:
    from mmcl.data.convert import convert_npz
    from mmcl.data.inspect import format_inspect, inspect_dataset

    from mmcl.data.schema import DataError

    try:
        fractions = tuple(float(x) for x in args.split.split(","))
    except ValueError:
        raise DataError(f"--split {args.split!r}: give three fractions that sum to 1, "
                        "e.g. --split 0.8,0.1,0.1") from None
    convert_npz(args.src, args.out, split=fractions, seed=args.seed, overwrite=args.overwrite,
                **_s3(args))
    print(format_inspect(inspect_dataset(args.out, **_s3(args))))
    print(f"wrote {args.out}")
    return 0


def cmd_data_import(args) -> int:
    from mmcl.data.ingest import import_table, load_spec
    from mmcl.data.inspect import format_inspect, inspect_dataset

    from mmcl.paths import resolve_import_spec

    from mmcl.train import console

    spec = resolve_import_spec(load_spec(args.spec))  # decode actors run elsewhere
    # pretrain's console rules (Ray's known-harmless notices, Ray Data's INFO and per-operator
    # output off); Ray Data's one overall bar (tqdm) on a terminal
    console.quiet_driver(args.verbose)
    console.quiet_data(args.verbose, bar=True)
    result = import_table(args.src, args.out, spec, overwrite=args.overwrite,
                          concurrency=args.concurrency, address=args.address, **_s3(args))
    print(format_inspect(inspect_dataset(args.out, **_s3(args))))
    print(result.summary())
    print(f"wrote {args.out}")
    return 0


def cmd_data_inspect(args) -> int:
    from mmcl.data.inspect import format_inspect, inspect_dataset

    info = inspect_dataset(args.path, **_s3(args))
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    if args.contact_sheet:
        from mmcl.data.inspect import contact_sheet

        shown = contact_sheet(args.path, args.contact_sheet, **_s3(args))
        print(f"wrote {args.contact_sheet} ({', '.join(shown)})" if shown
              else "no image modality: no contact sheet written", file=sys.stderr)
    return 0


def cmd_data_synth(args) -> int:
    from mmcl.data.inspect import format_inspect, inspect_dataset
    from mmcl.data.synth import generate

    generate(args.preset, args.out, n=args.n, seed=args.seed, overwrite=args.overwrite,
             image_size=args.image_size, source=args.source, **_s3(args))
    print(format_inspect(inspect_dataset(args.out, **_s3(args))))
    print(f"wrote {args.out}")
    return 0


def cmd_pretrain(args) -> int:
    from mmcl.train.launcher import pretrain

    cfg = _load_config(args)
    result = pretrain(cfg, address=args.address, in_process=args.no_ray,
                      continue_from=args.continue_from, verbose=args.verbose)
    print(result.summary())
    return 0


def _probe_settings(args):
    from mmcl.evaluate.diagnostics import ProbeSettings
    from mmcl.evaluate.embed import EmbedError

    try:
        return ProbeSettings(
            **({"l2_grid": tuple(args.l2_grid)} if args.l2_grid else {}),
            few_label_k=tuple(args.few_label_k),
            few_label_seeds=tuple(range(args.few_label_seeds)),
            max_rows=args.max_rows or None, seed=args.probe_seed,
            knn_k=args.knn_k, retrieval=tuple(args.retrieval) if args.retrieval else None)
    except ValueError as err:
        raise EmbedError(f"probe settings: {err}") from None


def cmd_embed(args) -> int:
    from mmcl.evaluate.embed import embed_run

    result = embed_run(args.run, args.out, args.data, args.splits, use_ray=not args.no_ray,
                       address=args.address, concurrency=args.concurrency,
                       batch_size=args.batch_size, use_gpu=args.gpu, overwrite=args.overwrite,
                       trust_plugins=args.allow_plugins, **_s3(args))
    print(result.summary())
    return 0


def cmd_eval(args) -> int:
    from mmcl.evaluate.embed import EmbedError
    from mmcl.evaluate.report import evaluate_runs, format_markdown

    if args.few_label_seeds < 0 or (args.max_rows is not None and args.max_rows < 0):
        raise EmbedError("--few-label-seeds and --max-rows must be >= 0")
    if args.batch_size < 1:
        raise EmbedError("--batch-size must be >= 1")
    # --no-ray: in this process; --ray, --address or --concurrency: Ray Data; else in this
    # process when the splits are small (mmcl.evaluate.embed.fits_in_process)
    use_ray = False if args.no_ray else (True if args.ray or args.address or args.concurrency
                                         else None)
    reports, combined = evaluate_runs(
        args.run, args.data, out=args.out, settings=_probe_settings(args),
        use_ray=use_ray, address=args.address, concurrency=args.concurrency,
        batch_size=args.batch_size, use_gpu=args.gpu, trust_plugins=args.allow_plugins,
        only=args.only, verbose=args.verbose,
        progress=lambda text: print(text, file=sys.stderr, flush=True), **_s3(args))
    print(format_markdown(combined or reports[0]))
    for report in reports if combined else []:
        print(f"per run: {report['_path']}")
    print(f"report: {(combined or reports[0])['_path']}")
    return 0


def cmd_report(args) -> int:
    from mmcl.evaluate.report import compare

    compare(args.runs, args.out, progress=print)
    return 0


def cmd_bench_perf(args) -> int:
    from mmcl.bench.perf import run_perf

    report = run_perf(quick=args.quick, out=args.out, sections=args.only or None)
    with open(f"{report['_out']}/perf.md") as f:
        print(f.read(), end="")
    print(f"wrote {report['_out']}/perf.json and {report['_out']}/perf.md")
    failed = [k for k, v in report["sections"].items() if "error" in v]
    return 1 if failed else 0


def cmd_bench_fidelity(args) -> int:
    from mmcl.bench.fidelity import run_fidelity
    from mmcl.data.schema import DataError

    if args.seeds is not None and args.seeds < 1:
        raise DataError("--seeds must be >= 1")
    report = run_fidelity(quick=args.quick, seeds=args.seeds, out=args.out,
                          preset=args.preset)
    with open(f"{report['_out']}/fidelity.md") as f:
        print(f.read(), end="")
    print(f"wrote {report['_out']}/fidelity.json and {report['_out']}/fidelity.md"
          + (f" and {report['plot']}" if report.get("plot") else ""))
    failed = [r for r in report["runs"] if "error" in r]
    return 1 if failed else 0


def cmd_bench_sampleopt(args) -> int:
    from mmcl.bench.sampleopt import compare_markdown, grid_markdown, run_compare, run_grid

    do_grid, do_compare = args.grid or not args.compare, args.compare or not args.grid
    if do_grid:
        report = run_grid(quick=args.quick, out=args.out)
        print(grid_markdown(report))
        args.out = report["_out"]
    if do_compare:
        report = run_compare(quick=args.quick, out=args.out)
        print(compare_markdown(report))
    return 0


def cmd_tune(args) -> int:
    from mmcl.tune.cli import run_tune

    result = run_tune(args.config, args.overrides, strategy=args.strategy,
                      address=args.address, stop_after_round=args.stop_after_round,
                      trust_state=args.trust_state)
    print(result.summary())
    return 130 if getattr(result, "interrupted", False) else 0


# -------------------------------------------------------------------------------- parser
# One function per command (`add_<command>(subparsers)`); a group (data, bench) lists its
# actions' functions, so a new action is one function and one entry in that list.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmcl",
        description="Distributed pretraining of multimodal contrastive encoders on Ray: "
        "TupleInfoNCE, CoMM, FactorCL and their baselines, on sharded multimodal tuples.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def add_config(sub) -> None:
    p = sub.add_parser("config", help="print the resolved run config (defaults + file + --set)",
                       description="Print the fully resolved run config as YAML: the "
                       "defaults, then the file, then --set overrides. Every field is shown.")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)


def add_data(sub) -> None:
    data = sub.add_parser("data", help="create and inspect tuple shard data sets",
                          description="Create and inspect data sets in mmcl's tuple shard "
                          "format (Parquet shards + manifest.json; local or s3://).")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    for add in DATA_ACTIONS:
        add(actions)


def add_data_convert(sub) -> None:
    p = sub.add_parser("convert", help="turn a NumPy .npz into a shard data set",
                       description="Turn a .npz (one array per modality, optional 1-D label "
                       "arrays; first axis = tuples) into a shard data set with a seeded "
                       "train/val/test split. Rank-2 float arrays become vector modalities, "
                       "rank 3 sequences, rank 4 images (C,H,W); 1-D integer arrays become "
                       "classification labels, 1-D float arrays regression labels.")
    p.add_argument("src", help="path of the .npz file")
    _add_out_arg(p)
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    _add_overwrite_arg(p)
    _add_s3_args(p)
    p.set_defaults(func=cmd_data_convert)


def add_data_import(sub) -> None:
    p = sub.add_parser("import", help="import a table or webdataset folder of real files "
                       "(images, audio, text, .npy) as a shard data set (Ray Data)",
                       description="Import a CSV/JSONL/Parquet table (one column per "
                       "modality and label) or a folder of webdataset .tar shards, decoding "
                       "and writing in parallel on Ray Data, as the YAML spec describes "
                       "(see README 'Data'). A failed import writes nothing.")
    p.add_argument("src", help="table file or webdataset folder (local path or s3://...)")
    _add_out_arg(p)
    p.add_argument("--spec", required=True, help="import spec YAML")
    _add_overwrite_arg(p)
    p.add_argument("--concurrency", type=int, default=None,
                   help="decode actors at most (default: the cluster's CPUs - 1)")
    p.add_argument("--verbose", action="store_true",
                   help="show all of Ray's own output (quiet by default, as pretrain)")
    _add_address_arg(p)
    _add_s3_args(p)
    p.set_defaults(func=cmd_data_import)


def add_data_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="summarise a shard data set",
                       description="Modalities and shapes, rows per split, per-modality "
                       "mean/std, label balance and controlled factors of a data set.")
    p.add_argument("path", help="data set folder (local path or s3://...)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--contact-sheet", metavar="PNG",
                   help="also write a few decoded images of each image modality to this PNG")
    _add_s3_args(p)
    p.set_defaults(func=cmd_data_inspect)


def add_data_synth(sub) -> None:
    p = sub.add_parser("synth", help="generate a controlled data set (rus, factorcl, weak, "
                       "factorcl_hard, many, trifeature)",
                       description="Generate one of the papers' controlled data sets, with "
                       "the true latent factors written as label columns: rus (redundancy, "
                       "uniqueness, synergy), factorcl (shared and unique factors), weak (a "
                       "low-SNR modality that alone carries a factor), factorcl_hard (factorcl "
                       "through a non-linear map, with distractors), many (six noisy views of "
                       "one class), trifeature (pairs of images: shared shape, unique "
                       "textures, a texture-colour synergy; CoMM's benchmark).")
    p.add_argument("--preset", required=True, choices=["rus", "factorcl", "weak", "factorcl_hard", "many",
                                                   "trifeature"],
                   help="trifeature: CoMM's bimodal Trifeature images, written as PNG files "
                   "and a table (--source) and then imported with `mmcl data import`")
    _add_out_arg(p)
    p.add_argument("--n", type=int, default=4096, help="tuples over all splits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32,
                   help="trifeature: image height and width in pixels")
    p.add_argument("--source", help="trifeature: folder for the PNG files and the table "
                   "(default: OUT-source next to a local OUT, a temporary folder otherwise)")
    _add_overwrite_arg(p)
    _add_s3_args(p)
    p.set_defaults(func=cmd_data_synth)


def add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain encoders with an objective (Ray Train)",
                       description="Pretrain on local Ray (started for you, sized so Ray Data "
                       "keeps a CPU) or on a cluster (--address). Rerunning an unfinished run "
                       "(same storage.path and storage.name) resumes from its newest "
                       "checkpoint; a finished run is never changed: train more with "
                       "--continue-from RUN --set storage.name=NEW.")
    _add_config_args(p)
    _add_address_arg(p)
    p.add_argument("--no-ray", action="store_true",
                   help="train in this process on in-memory data (debugging, tiny data)")
    p.add_argument("--continue-from", metavar="RUN",
                   help="a finished run's folder: start this new run (storage.name) from "
                   "its weights (fresh optimiser and schedule, train.epochs more epochs)")
    p.add_argument("--verbose", action="store_true",
                   help="show all of Ray's own output (quiet by default: a progress bar and "
                   "one line per epoch)")
    p.set_defaults(func=cmd_pretrain)


def add_embed(sub) -> None:
    p = sub.add_parser("embed", help="embed a data set with a trained run (Ray Data)",
                       description="Batch inference with Ray Data: an actor pool where each "
                       "actor loads the run's model once embeds every split and writes Parquet "
                       "(OUT/split=<split>/*.parquet: id, the fused embedding, each modality's "
                       "own embedding as fixed-shape tensor columns, and the label and factor "
                       "columns). Streams: the data set may be larger than memory. Rows are "
                       "not in id order.")
    p.add_argument("--run", required=True, help="run folder written by `mmcl pretrain`")
    p.add_argument("--data", help="data set to embed (default: the run's own data set)")
    _add_out_arg(p)
    p.add_argument("--splits", nargs="+", metavar="SPLIT",
                   help="splits to embed (default: every split of the data set)")
    _add_embed_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_s3_args(p)
    p.set_defaults(func=cmd_embed)


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="embed, probe and diagnose runs; write eval/report.*",
                       description="Embed train/val/test (Ray Data), fit linear probes on the "
                       "frozen embeddings (L2 chosen on val, refit on train+val, scored on "
                       "test; logistic regression for classification, ridge for regression), "
                       "few-label probes, and per-factor diagnostics of the fused embedding, "
                       "each modality's own embedding and the raw features. Writes "
                       "RUN/eval/report.json and RUN/eval/report.md and prints the tables. "
                       "Several runs (seeds of one config): also mean ± std over them.")
    p.add_argument("--run", required=True, nargs="+", metavar="RUN",
                   help="run folder(s) written by `mmcl pretrain`")
    p.add_argument("--data", help="data set to evaluate on (default: each run's own)")
    p.add_argument("--out", help="folder of the several-run report (default: "
                   "FIRST_RUN/eval/seeds)")
    p.add_argument("--only", choices=["probe", "retrieval"],
                   help="only the probes (linear, kNN, few-label; no retrieval), or only "
                   "cross-modal retrieval (embeds the test split alone; no probes)")
    p.add_argument("--ray", action="store_true",
                   help="embed on Ray Data even when the splits are small (default: small "
                   "splits, up to 256 MiB of values, are embedded in this process)")
    p.add_argument("--verbose", action="store_true",
                   help="show all of Ray's own output (quiet by default, as pretrain)")
    _add_embed_args(p)
    _add_probe_args(p)
    _add_s3_args(p)
    p.set_defaults(func=cmd_eval)


def add_report(sub) -> None:
    p = sub.add_parser("report", help="compare evaluated runs side by side (+ PNG plots)",
                       description="Side-by-side markdown tables of several runs' evaluation "
                       "reports (run `mmcl eval` first) and their final training metrics; "
                       "PNG plots of the training curves and of probe scores per factor per "
                       "run when matplotlib is installed (pip install 'mmcl[plot]').")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folders, eval folders (e.g. RUN/eval/seeds) or report.json files")
    p.add_argument("--out", help="output folder (default: the runs' storage folder/_report)")
    p.set_defaults(func=cmd_report)


def add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="measure performance side by side (JSON + markdown)",
                           description="Benchmarks. Figures are ratios measured in the same "
                           "run (interleaved), each with the machine, its load, the versions "
                           "and the settings.")
    actions = bench.add_subparsers(dest="bench_command", metavar="ACTION", required=True)
    for add in BENCH_ACTIONS:
        add(actions)


def add_bench_perf(sub) -> None:
    p = sub.add_parser("perf", help="objective steps, critics, loss memory, reads, the Ray "
                       "data plane, scaling and start-up",
                       description="TupleInfoNCE's step against re-encoding and plain tuple "
                       "contrast (M = 2, 3, 4); FactorCL pair scores against tiling; loss "
                       "memory against the global batch; shard read throughput against "
                       "list<float>; the Ray data path against in-memory training (same "
                       "model, batch, workers), data wait, 1 vs 2 workers; an image+text step "
                       "with hf backbones, trainable vs frozen; the README demo's "
                       "start-up. Writes OUT/perf.json and OUT/perf.md.")
    p.add_argument("--quick", action="store_true",
                   help="smaller data and fewer rounds (about 2 minutes on 2 cores)")
    p.add_argument("--out", help="output folder (default: runs/bench/quick or runs/bench/full)")
    p.add_argument("--only", action="append", metavar="SECTION",
                   choices=["objective_step", "efficiency", "critics", "loss_memory",
                            "hf_encoders", "encoders", "clip_step", "online_probe", "read",
                            "data_plane", "ray_images", "startup", "import", "compile"],
                   help="run only this section (repeatable; default: all but import, which "
                   "runs only when named)")
    p.set_defaults(func=cmd_bench_perf)


def add_bench_fidelity(sub) -> None:
    p = sub.add_parser("fidelity", help="what each objective learns: redundancy, uniqueness, "
                       "synergy, shared/unique and weak-modality factors, mean ± std over seeds",
                       description="Pretrain every objective (cross, cross_self, tuple, "
                       "tuple_infonce, comm, comm with concat fusion, factorcl_ssl, supcon) on "
                       "the controlled data sets rus, factorcl and weak with the same encoders "
                       "and budget (in process: the Ray workers' Engine on in-memory tensors, "
                       "no Ray), probe every factor with mmcl's linear probe, and write a table "
                       "of mean ± std over seeds with the raw-feature probe and a randomly "
                       "initialised encoder as references, the papers' targets checked "
                       "(met / not met), and a PNG of grouped bars. Writes OUT/fidelity.json, "
                       "OUT/fidelity.md, OUT/fidelity.png, OUT/runs.jsonl.")
    p.add_argument("--seeds", type=int, metavar="N",
                   help="seeds 0..N-1, each a new data set draw and model (default: 3; "
                   "--quick: 1)")
    p.add_argument("--quick", action="store_true",
                   help="tiny data, 2 epochs, a small model: every row and column, numbers "
                   "not meaningful (about a minute on 2 cores)")
    p.add_argument("--preset", choices=["trifeature"],
                   help="trifeature: CoMM's bimodal Trifeature table on images (cross, "
                   "cross_self, comm, comm_linear, tuple, tuple_infonce, factorcl_ssl; the "
                   "built-in CNN on 64x64 renders) instead of the vector presets")
    p.add_argument("--out", help="output folder (default: runs/bench/fidelity, "
                   "runs/bench/fidelity-trifeature, with -quick for --quick)")
    p.set_defaults(func=cmd_bench_fidelity)


TUNE_STRATEGIES = ("sweep", "sample-opt")


def add_tune(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "tune", help="search hyperparameters with Ray Tune (sweep or sample optimization)",
        description="Search a run config's hyperparameters on Ray Tune. A tune file is a run "
        "config in which any field may be a distribution ({tune: loguniform, low: .., high: "
        "..}, uniform, choice, grid, randint, qrandint, ...), plus `sweep:` or `sample_opt:` "
        "settings. --strategy sweep: each trial is one Ray Train run scored on the validation "
        "split (linear probe when the data has a label, else TupleInfoNCE's reward R); "
        "random, grid or TPE (Optuna) search; ASHA early stopping; writes best_config.yaml and "
        "a table of trials. --strategy sample-opt: TupleInfoNCE's sample optimization (a "
        "Gaussian policy over per-modality negative weights and augmentation strengths, "
        "REINFORCE on R); writes trajectory.json/png and the final model. Running the same "
        "command again resumes an interrupted search.")
    p.add_argument("--config", "-c", required=True, help="tune file (see configs/tune_*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, a distribution or a sweep/sample_opt setting, e.g. "
                   "--set sweep.num_samples=16 --set 'train.lr={tune: loguniform, low: 1e-4, "
                   "high: 1e-2}' (repeatable)")
    p.add_argument("--strategy", choices=TUNE_STRATEGIES, default=None,
                   help="sweep or sample-opt (default: sample-opt when the file has a "
                   "`sample_opt:` section and no `sweep:`, else sweep)")
    p.add_argument("--address", help="Ray cluster to join: 'auto' or ray://host:port "
                   "(default: start local Ray sized for the trials)")
    p.add_argument("--stop-after-round", type=int, metavar="N",
                   help="sample-opt: pause after round N (resume by running again)")
    p.add_argument("--trust-state", action="store_true",
                   help="re-sign the search folder's saved Tune state as trusted before "
                   "resuming it (only for a folder you know nobody else wrote: resuming "
                   "unpickles it); without it, a folder whose signatures do not verify is "
                   "refused")
    p.set_defaults(func=cmd_tune)
    return p


# ------------------------------------------------------------------ shared arguments


def _add_out_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (local path or s3://...)")


def _add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing data set")


def _add_address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join: 'auto' or ray://host:port "
                   "(default: start local Ray)")


def _add_embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-ray", action="store_true",
                   help="embed in this process, shard by shard (small data, debugging)")
    _add_address_arg(p)
    p.add_argument("--concurrency", type=int, metavar="N",
                   help="most embedding actors (default: CPUs - 1 up to 4, or one per GPU)")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per inference batch")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", dest="gpu", action="store_true", default=None,
                     help="one GPU per actor (default: when the cluster has GPUs)")
    gpu.add_argument("--no-gpu", dest="gpu", action="store_false", help="CPU actors only")
    p.add_argument("--allow-plugins", action="store_true",
                   help="import the plug-in encoder (kind: 'package.module:Class') that the "
                   "run's recorded config.yaml names; refused without it, since that runs the "
                   "module's code (only for a run folder you trust)")


def _add_probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--few-label-k", type=int, nargs="*", default=[5, 10, 50], metavar="K",
                   help="labelled tuples per class of the few-label probes (default: 5 10 50; "
                   "none: off)")
    p.add_argument("--few-label-seeds", type=int, default=3, metavar="N",
                   help="draws per few-label k, averaged (default: 3)")
    p.add_argument("--l2-grid", type=float, nargs="+", metavar="L2",
                   help="L2 strengths the validation split chooses from (default: 1e-6 .. "
                   "1e-1, x10 steps)")
    p.add_argument("--max-rows", type=int, default=100_000, metavar="N",
                   help="probe on at most N rows per split, a seeded sample (default: "
                   "100000; 0: all)")
    p.add_argument("--probe-seed", type=int, default=0, help="seed of that sample")
    p.add_argument("--knn-k", type=int, default=20, metavar="K",
                   help="neighbours of the weighted kNN probe (default: 20, T = 0.07; 0: off)")
    p.add_argument("--retrieval", nargs="+", metavar="A:B",
                   help="modality pairs for cross-modal recall@k on test (default: every pair "
                   "the objective puts in one space; the report names those it cannot)")


DATA_ACTIONS = [add_data_convert, add_data_import, add_data_inspect, add_data_synth]
def add_bench_sampleopt(sub) -> None:
    p = sub.add_parser("sampleopt", help="does TupleInfoNCE's sample optimization beat the "
                       "defaults and random search? (grid ground truth; equal-compute "
                       "comparison on Ray)",
                       description="--grid: TupleInfoNCE on the `weak` data set at every "
                       "(alpha_weak, beta_weak) of a grid, every seed, in process; each model's "
                       "weak factor probed and its reward R computed (the ground truth). "
                       "--compare: (a) the defaults, (b) Ray Tune random search over the same "
                       "box, (c) `mmcl tune --strategy sample-opt`, at equal compute on local "
                       "Ray, probed like the grid, with the share of a round spent outside "
                       "training. Neither flag: both.")
    p.add_argument("--grid", action="store_true", help="the (alpha_weak, beta_weak) grid "
                   "(in process, no Ray): OUT/grid.{json,md,png}")
    p.add_argument("--compare", action="store_true", help="(a) defaults, (b) random search, "
                   "(c) sample optimization at equal compute on local Ray: "
                   "OUT/compare.{json,md,png}")
    p.add_argument("--quick", action="store_true", help="tiny data, one seed: a smoke test "
                   "(the numbers mean nothing)")
    p.add_argument("--out", help="output folder (default: runs/bench/sampleopt[-quick])")
    p.set_defaults(func=cmd_bench_sampleopt)


BENCH_ACTIONS = [add_bench_perf, add_bench_fidelity, add_bench_sampleopt]
COMMANDS = [add_config, add_data, add_pretrain, add_embed, add_eval, add_report, add_bench,
            add_tune]


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the user asked for something wrong', not a bug."""
    from mmcl.config import ConfigError
    from mmcl.data.schema import DataError

    errors: list[type[BaseException]] = [ConfigError, DataError, FileNotFoundError]
    try:
        from mmcl.objectives.base import ObjectiveError
        from mmcl.train.checkpoint import CheckpointError
        from mmcl.train.engine import NonFiniteLossError

        errors += [ObjectiveError, CheckpointError, NonFiniteLossError]
    except ImportError:  # torch missing: the errors above still apply
        pass
    try:
        from mmcl.train.launcher import LaunchError

        errors.append(LaunchError)
    except ImportError:
        pass
    return tuple(errors)


def readable(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`message` cut to `limit` characters, saying how much was left out."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]} ... ({len(message) - limit} more characters not shown)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head` and friends: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as err:  # Ctrl-C; a command may say where its work stands
        said = " ".join(str(err).split())
        print(f"mmcl: interrupted{': ' + readable(said) if said else ''}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - sorted into user errors and bugs below
        cause = user_error_in(err)
        if cause is not None:
            print(f"mmcl: error: {readable(str(cause))}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise


def user_error_in(err: BaseException) -> BaseException | None:
    """`err` if it is a user error, else the user error behind it: a cause, or a Ray Train
    worker's failure (a checkpoint refused on a worker arrives inside a WorkerGroupError,
    wrapped with its traceback text in a UserExceptionWithTraceback)."""
    kinds, seen, todo = user_errors(), set(), [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen or len(seen) > 50:
            continue
        seen.add(id(e))
        if isinstance(e, kinds):
            return e
        todo += [e.__cause__, getattr(e, "_base_exc", None), getattr(e, "cause", None),
                 *getattr(e, "worker_failures", {}).values()]
    return None


if __name__ == "__main__":
    sys.exit(main())
