"""What a run prints: a progress bar per epoch, one line per epoch, and little of Ray's noise.

Quiet by default (`mmcl pretrain --verbose` shows everything). Each kind of noise is silenced
where it comes from, not by swallowing output wholesale:

- Ray Train's own INFO/WARNING chatter on the console (TrainingReport dumps, "Requesting
  resources", "Moving model to device", transient "Failed to send resource request"
  tracebacks): `ray.train.LoggingConfig(log_level="ERROR")` (`train_logging`). Ray Train
  still writes every level to its log files under the session folder, and a failed run still
  raises with its cause.
- The driver's `ray` logger: INFO off (`ray.init(logging_level=...)`, `driver_init_kwargs`),
  and a logging.Filter for warnings mmcl knows to be harmless (`HARMLESS`).
- Ray Data's per-epoch "Starting execution" / "Execution plan" banners:
  `DataContext.print_on_execution_start` (`quiet_data`); the "Progress bars disabled" notice
  goes with the others below.
- Lines that other Ray processes send to the driver (log_to_driver) and that no setting
  reaches: the PlacementGroupCleaner actor's "Failed to query Ray Train Controller actor
  state" (it polls the state API, which is slow on a loaded machine), the core worker's
  "constructor arguments in the object store and max_restarts > 0" (Ray Train's own
  PreemptionWatcher actor), Ray Data's "execution finished" lines, the TrainingReport dump
  of a logger Ray Train names after its file. `filter_worker_logs` drops exactly these
  lines (and the PlacementGroupCleaner's, `QUIET_ACTORS`) before Ray's own printer, which
  also de-duplicates, sees them. Ray Data's driver-side INFO goes with the `ray` logger's.
- Python warnings Ray raises from its own code about its own deprecated internals
  (`ExecutionOptions.exclude_resources`, which mmcl never sets).

Under `ray job submit` the driver is the entrypoint process, so `ray job logs` reads the same.
Progress bars render only when the driver's stderr is a terminal: in logs a bar's redraws
would become pages of carriage returns, and the epoch lines are the progress there.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

# Lines Ray prints that mmcl knows to be harmless in a healthy run (regular expressions,
# searched in each line). Each names where it comes from.
HARMLESS: tuple[str, ...] = (
    # ray.train PlacementGroupCleaner actor: the state API timed out; it retries.
    r"Failed to query Ray Train Controller actor state",
    # core_worker.cc, for Ray Train's own PreemptionWatcher actor.
    r"has constructor arguments in the object store and max_restarts > 0",
    # ray.data: mmcl turns the bars off itself when not on a terminal.
    r"Progress bars (for operators )?disabled",
    # ray.data's end-of-epoch banner in the SplitCoordinator actor (one per epoch).
    r"Dataset \S+ execution finished in",
    r"(Starting execution of|Execution plan of) Dataset",
    # Ray Train worker: its TrainingReport dump is logged by a logger named after the file
    # (not under `ray.train`), so Ray Train's LoggingConfig does not reach it.
    r"Reporting training result \d+: TrainingReport\(",
    # ray.init: token authentication is on (the secure default); the notice says how to
    # turn it off, which mmcl does not want to suggest.
    r"Token authentication is enabled for this Ray cluster",
    # ray.init's INFO notices (commands that start or join Ray without driver_init_kwargs:
    # data import); mmcl says what it runs itself.
    r"Started a local Ray instance",
    r"Connect(ing|ed) to (existing )?Ray cluster",
    # ray.data's HighMemoryIssueDetector (mmcl eval's embedding actors, data import's
    # decoders): a heuristic against Ray's default per-worker memory request, repeated
    # every 30 s and at the end; mmcl's actors hold one model or one block at a time.
    r"Operator '[^']*' uses? .* of memory per worker",
)
_HARMLESS = re.compile("|".join(f"(?:{p})" for p in HARMLESS))
# Actors whose every line is Ray's own housekeeping, never actionable in an mmcl run: the
# PlacementGroupCleaner only removes a dead controller's placement group, and on a machine
# running several Ray instances its state-API lookups fail with tracebacks (a Ray issue).
QUIET_ACTORS: tuple[str, ...] = ("PlacementGroupCleaner",)
# Ray warns about its own ExecutionOptions field that its Train data config sets.
_RAY_DEPRECATIONS = (r"`ExecutionOptions\.exclude_resources` is deprecated",)


def is_harmless(line: str) -> bool:
    return bool(_HARMLESS.search(line))


class HarmlessFilter(logging.Filter):
    """Drops log records whose message is one of Ray's known-harmless lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_harmless(record.getMessage())


# ------------------------------------------------------------------------------ driver

# The driver's choice, read where the TorchTrainer is built (launcher.make_trainer keeps its
# signature, which tests and benchmarks wrap). Processes that never set it (Tune's trial
# actors) keep Ray's full output, as before.
_verbose = True


def set_verbose(verbose: bool) -> None:
    global _verbose
    _verbose = bool(verbose)


def is_verbose() -> bool:
    return _verbose


def driver_init_kwargs(verbose: bool) -> dict:
    """Extra ray.init arguments: the driver's `ray` logger at WARNING unless verbose."""
    return {} if verbose else {"logging_level": logging.WARNING}


def quiet_driver(verbose: bool) -> None:
    """Before ray.init: filter the known-harmless warnings of the driver's `ray` logger and
    Ray's warnings about its own deprecated internals. Idempotent."""
    if verbose:
        return
    import ray  # noqa: F401  (configures the `ray` logger and its handler on import)

    for handler in logging.getLogger("ray").handlers:
        if not any(isinstance(f, HarmlessFilter) for f in handler.filters):
            handler.addFilter(HarmlessFilter())
    for message in _RAY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message)
    # Ray Data's driver-side INFO (parquet size estimates) has its own handler.
    import ray.data  # noqa: F401  (configures the `ray.data` logger on import)

    data_logger = logging.getLogger("ray.data")
    data_logger.setLevel(logging.WARNING)
    for handler in data_logger.handlers:
        if not any(isinstance(f, HarmlessFilter) for f in handler.filters):
            handler.addFilter(HarmlessFilter())


def quiet_data(verbose: bool, bar: bool = False) -> None:
    """Ray Data prints no execution banner per epoch, and no bars unless verbose: mmcl's own
    bar shows the training steps and the data wait. Verbose (or `bar`: commands whose whole
    work is one Ray Data job, data import and Ray-side embedding), one overall Ray Data bar
    (tqdm) on a terminal only (in logs, bars become pages of carriage returns)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_operator_progress_bars = False
    context.enable_progress_bars = (verbose or bar) and sys.stderr.isatty()
    context.print_on_execution_start = verbose


def train_logging(verbose: bool | None = None):
    """Ray Train's console log level: everything when verbose (default: the driver's
    choice, `set_verbose`), else errors only."""
    import ray.train

    verbose = is_verbose() if verbose is None else verbose
    return ray.train.LoggingConfig(log_level="INFO" if verbose else "ERROR")


def filter_worker_logs(verbose: bool) -> bool:
    """After ray.init: drop the known-harmless lines that Ray processes send to this driver,
    before Ray's printer (and its de-duplication) sees them. Returns whether the filter is
    in place; Ray keeps this dispatcher private, so a Ray without it just prints everything.
    """
    if verbose:
        return False
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    with dispatcher._lock:
        handlers = list(dispatcher.handlers)
    if any(getattr(h, "mmcl_quiet", False) for _, h in handlers):
        return True
    for name, handler in handlers:
        if name == "ray_print_logs":
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, _filtering(handler))
            return True
    return False


def _filtering(print_logs):
    def handle(data: dict) -> None:
        if data.get("actor_name") in QUIET_ACTORS:
            return
        # Blank lines too: Ray Train's print patch adds one after each tqdm_ray state line.
        lines = [line for line in data.get("lines", [])
                 if line.strip() and not is_harmless(line)]
        if lines:
            print_logs({**data, "lines": lines})

    handle.mmcl_quiet = True
    return handle


# ------------------------------------------------------------------------------ lines


def epoch_line(summary: dict, epochs: int) -> str:
    """The one line per epoch (the global samples/s when several workers ran)."""
    rate = summary.get("samples_per_s_total", summary.get("samples_per_s", 0.0))
    # the online probe's figures (mmcl.evaluate.online: probe_<label> keys)
    probes = "".join(f"  {k.replace('_', ' ', 1)} {v:.3f}" for k, v in summary.items()
                     if k.startswith("probe_") and isinstance(v, (int, float)))
    return (f"[mmcl] epoch {summary['epoch']}/{epochs}  step {summary['step']}  "
            f"loss {summary['loss']:.4f}  {rate:.0f} samples/s  "
            f"data wait {summary.get('data_wait_fraction', 0.0):.1%}{probes}")


def log_epoch(summary: dict, epochs: int) -> None:
    """Print the epoch line from a Ray Train worker exactly once.

    Ray Train redirects a worker's print() to its logger AND tees it to the original
    stdout, so a plain print reaches the driver twice; the root logger reaches it once (and
    Ray Train's log file)."""
    logging.getLogger("mmcl.train").info(epoch_line(summary, epochs))


# ------------------------------------------------------------------------------ progress bar


def bar_description(epoch: int, epochs: int, metrics: dict) -> str:
    return (f"epoch {epoch}/{epochs} loss {metrics['loss']:.4f} "
            f"{metrics.get('samples_per_s', 0.0):.0f} samples/s "
            f"wait {metrics.get('data_wait_fraction', 0.0):.0%}")


class EpochProgress:
    """One bar per epoch on rank 0: steps, loss, samples/s and data wait.

    In a Ray worker the bar is Ray's `tqdm_ray` (drawn by the driver, updated at most once
    a second, so no redraw floods the log stream); in a plain process it is tqdm on
    stderr. Disabled, every method is a no-op."""

    def __init__(self, epoch: int, epochs: int, total_steps: int, enabled: bool):
        self.epoch, self.epochs = epoch, epochs
        self.bar = _make_bar(f"epoch {epoch}/{epochs}", total_steps) if enabled else None

    def update(self, metrics: dict) -> None:
        if self.bar is None:
            return
        self.bar.set_description(bar_description(self.epoch, self.epochs, metrics))
        self.bar.update(metrics.get("steps", 1))  # the steps since the last log

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _make_bar(desc: str, total: int):
    import ray

    if ray.is_initialized() and ray._private.worker.global_worker.mode == ray.WORKER_MODE:
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return ray_tqdm(desc=desc, total=total, unit="step")
    from tqdm import tqdm

    return tqdm(desc=desc, total=total, unit="step", leave=False, file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0)


def show_bar() -> bool:
    """Bars only where they render: the driver's stderr is a terminal."""
    return sys.stderr.isatty()


__all__ = ["HARMLESS", "EpochProgress", "HarmlessFilter", "driver_init_kwargs",
           "epoch_line", "filter_worker_logs", "is_harmless", "log_epoch", "quiet_data",
           "quiet_driver", "show_bar", "train_logging"]
