"""`mmcl`: the command line. Each subcommand parses, then calls one library function.

Heavy imports (torch, ray) happen inside the handlers, so `mmcl --help` is instant. Errors a
user can cause end in one line on stderr and exit code 2; nothing else is printed.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_USER_ERROR = 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="run config YAML (default: built-in defaults; see "
                   "configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.batch_size=512 (repeatable)")


def _load_config(args):
    from mmcl import config

    return config.load(args.config, args.overrides)


# ------------------------------------------------------------------------------ handlers

def cmd_config(args) -> int:
    from mmcl import config

    print(config.dump(_load_config(args)), end="")
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
    convert_npz(args.src, args.out, split=fractions, seed=args.seed, overwrite=args.overwrite)
    print(format_inspect(inspect_dataset(args.out)))
    print(f"wrote {args.out}")
    return 0


def cmd_data_inspect(args) -> int:
    from mmcl.data.inspect import format_inspect, inspect_dataset

    info = inspect_dataset(args.path)
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0


def cmd_data_synth(args) -> int:
    from mmcl.data.inspect import format_inspect, inspect_dataset
    from mmcl.data.synth import generate

    generate(args.preset, args.out, n=args.n, seed=args.seed, overwrite=args.overwrite)
    print(format_inspect(inspect_dataset(args.out)))
    print(f"wrote {args.out}")
    return 0


def cmd_pretrain(args) -> int:
    from mmcl.train.launcher import pretrain

    cfg = _load_config(args)
    result = pretrain(cfg, address=args.address, in_process=args.no_ray)
    print(result.summary())
    return 0


# -------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmcl",
        description="Distributed pretraining of multimodal contrastive encoders on Ray: "
        "TupleInfoNCE, CoMM, FactorCL and their baselines, on sharded multimodal tuples.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("config", help="print the resolved run config (defaults + file + --set)",
                       description="Print the fully resolved run config as YAML: the "
                       "defaults, then the file, then --set overrides. Every field is shown.")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    data = sub.add_parser("data", help="create and inspect tuple shard data sets",
                          description="Create and inspect data sets in mmcl's tuple shard "
                          "format (Parquet shards + manifest.json; local or s3://).")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = dsub.add_parser("convert", help="turn a NumPy .npz into a shard data set",
                        description="Turn a .npz (one array per modality, optional 1-D label "
                        "arrays; first axis = tuples) into a shard data set with a seeded "
                        "train/val/test split. Rank-2 float arrays become vector modalities, "
                        "rank 3 sequences, rank 4 images (C,H,W); 1-D integer arrays become "
                        "classification labels, 1-D float arrays regression labels.")
    p.add_argument("src", help="path of the .npz file")
    p.add_argument("--out", required=True, help="output folder (local path or s3://...)")
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--overwrite", action="store_true", help="replace an existing data set")
    p.set_defaults(func=cmd_data_convert)

    p = dsub.add_parser("inspect", help="summarise a shard data set",
                        description="Modalities and shapes, rows per split, per-modality "
                        "mean/std, label balance and controlled factors of a data set.")
    p.add_argument("path", help="data set folder (local path or s3://...)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_data_inspect)

    p = dsub.add_parser("synth", help="generate a controlled data set (rus, factorcl, weak)",
                        description="Generate one of the papers' controlled data sets, with "
                        "the true latent factors written as label columns: rus (redundancy, "
                        "uniqueness, synergy), factorcl (shared and unique factors), weak (a "
                        "low-SNR modality that alone carries a factor).")
    p.add_argument("--preset", required=True, choices=["rus", "factorcl", "weak"])
    p.add_argument("--out", required=True, help="output folder (local path or s3://...)")
    p.add_argument("--n", type=int, default=4096, help="tuples over all splits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing data set")
    p.set_defaults(func=cmd_data_synth)

    p = sub.add_parser("pretrain", help="pretrain encoders with an objective (Ray Train)",
                       description="Pretrain on local Ray (started for you, sized so Ray Data "
                       "keeps a CPU) or on a cluster (--address). Rerunning with the same "
                       "storage.path and storage.name resumes from the latest checkpoint.")
    _add_config_args(p)
    p.add_argument("--address", help="Ray cluster to join: 'auto' or ray://host:port "
                   "(default: start local Ray)")
    p.add_argument("--no-ray", action="store_true",
                   help="train in this process on in-memory data (debugging, tiny data)")
    p.set_defaults(func=cmd_pretrain)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head` and friends: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("mmcl: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - sorted into user errors and bugs below
        if isinstance(err, user_errors()):
            print(f"mmcl: error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise


if __name__ == "__main__":
    sys.exit(main())
