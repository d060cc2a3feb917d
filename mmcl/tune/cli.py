"""What `mmcl tune` runs once mmcl/cli.py has parsed it: choose the strategy, re-sign the
search folder on request, run the sweep or the sample optimization."""

from __future__ import annotations

import sys


def choose_strategy(tune_file, strategy: str | None) -> str:
    if strategy:
        return strategy
    has = {name: bool(tune_file.sections.get(name)) for name in ("sweep", "sample_opt")}
    return "sample-opt" if has["sample_opt"] and not has["sweep"] else "sweep"


def run_tune(config_path: str, overrides: list[str], strategy: str | None = None,
             address: str | None = None, stop_after_round: int | None = None,
             trust_state: bool = False):
    """The search a tune file describes; returns the sweep's or sample-opt's result."""
    from mmcl.tune import space

    tune_file = space.load(config_path, overrides)
    strategy = choose_strategy(tune_file, strategy)
    if trust_state:
        resign(tune_file)
    if strategy == "sweep":
        if stop_after_round is not None:
            from mmcl.config import ConfigError

            raise ConfigError("--stop-after-round applies to --strategy sample-opt only")
        from mmcl.tune.sweep import run_sweep

        return run_sweep(tune_file, address=address)
    from mmcl.tune.sample_opt import run_sample_opt

    return run_sample_opt(tune_file, address=address, stop_after_round=stop_after_round)


def resign(tune_file) -> None:
    """`--trust-state`: sign the search folder as it is now, on the user's word."""
    from mmcl.storage import join
    from mmcl.tune import trust
    from mmcl.tune.common import search_name
    from mmcl.tune.sample_opt import STATE_NAME
    from mmcl.tune.trial import absolute_paths

    base = absolute_paths(tune_file).base_config()
    url = join(base.storage.path, search_name(tune_file, base))
    signed = trust.resign_search(url, base.storage.endpoint_url, base.storage.region,
                                 STATE_NAME)
    print(f"[mmcl] --trust-state: re-signed {len(signed)} folder(s)/state file(s) in {url}",
          file=sys.stderr)
