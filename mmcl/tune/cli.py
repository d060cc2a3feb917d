"""`mmcl tune`: sweeps and TupleInfoNCE's sample optimization on Ray Tune.

`add_tune_parser(subparsers)` registers the subcommand on mmcl's command line;
`main(argv)` runs it on its own (`python -m mmcl.tune.cli --config FILE`, ray_jobs/tune.py).
"""

from __future__ import annotations

import argparse
import sys

STRATEGIES = ("sweep", "sample-opt")


def add_tune_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
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
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
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


def choose_strategy(tf, strategy: str | None) -> str:
    if strategy:
        return strategy
    has = {name: bool(tf.sections.get(name)) for name in ("sweep", "sample_opt")}
    return "sample-opt" if has["sample_opt"] and not has["sweep"] else "sweep"


def cmd_tune(args) -> int:
    from mmcl.tune import space

    tf = space.load(args.config, args.overrides)
    strategy = choose_strategy(tf, args.strategy)
    if args.trust_state:
        resign(tf)
    if strategy == "sweep":
        if args.stop_after_round is not None:
            from mmcl.config import ConfigError

            raise ConfigError("--stop-after-round applies to --strategy sample-opt only")
        from mmcl.tune.sweep import run_sweep

        result = run_sweep(tf, address=args.address)
    else:
        from mmcl.tune.sample_opt import run_sample_opt

        result = run_sample_opt(tf, address=args.address,
                                stop_after_round=args.stop_after_round)
    print(result.summary())
    return 130 if getattr(result, "interrupted", False) else 0


def resign(tf) -> None:
    """`--trust-state`: sign the search folder as it is now, on the user's word."""
    from mmcl.storage import join
    from mmcl.tune import trust
    from mmcl.tune.sample_opt import STATE_NAME
    from mmcl.tune.sweep import search_name
    from mmcl.tune.trial import absolute_paths

    base = absolute_paths(tf).base_config()
    url = join(base.storage.path, search_name(tf, base))
    signed = trust.resign_search(url, base.storage.endpoint_url, base.storage.region,
                                 STATE_NAME)
    print(f"[mmcl] --trust-state: re-signed {len(signed)} folder(s)/state file(s) in {url}",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`mmcl tune ...` on its own (`python -m mmcl.tune.cli`, ray_jobs/tune.py): mmcl's own
    command line, so user errors end the same way (one line, exit 2)."""
    from mmcl.cli import main as mmcl_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return mmcl_main(argv if argv[:1] == ["tune"] else ["tune", *argv])


if __name__ == "__main__":
    sys.exit(main())
