"""The quiet console: which of Ray's lines are dropped, which are kept, and the epoch line."""

import logging

import pytest

from mmcl.train import console

# Lines copied from a run of the README demo on Ray 2.60 (prefixes as the driver receives them).
HARMLESS_SAMPLES = [
    "Failed to query Ray Train Controller actor state. State API may be temporarily "
    "unavailable. Continuing to monitor.",
    "[2026-12-01 20:05:11,542 E 8800 9003] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: '96f1' has constructor arguments in the object store and "
    "max_restarts > 0. If the arguments in the object store go out of scope",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current()."
    "enable_progress_bars = True`.",
    "✔️  Dataset train_0357JQ_0 execution finished in 16.98 seconds",
    "Reporting training result 3: TrainingReport(checkpoint=None, metrics={'loss': 0.73}, "
    "validation=False) from rank 1",
    "Starting execution of Dataset train_0357JQ_1. Full logs are in /tmp/ray/session/logs",
]
KEPT_SAMPLES = [
    "[mmcl] epoch 1/5  step 12  loss 2.5562  118 samples/s  data wait 77.6%",
    "ValueError: the batch lacks modality 'a'",
    "Traceback (most recent call last):",
    "Worker 1 died unexpectedly; restarting the worker group",
]


@pytest.mark.parametrize("line", HARMLESS_SAMPLES)
def test_known_harmless_lines_are_recognised(line):
    assert console.is_harmless(line)


@pytest.mark.parametrize("line", KEPT_SAMPLES)
def test_other_lines_are_kept(line):
    assert not console.is_harmless(line)


def test_the_driver_filter_drops_harmless_blank_and_housekeeping_lines_only():
    printed = []
    handle = console._filtering(printed.append)
    handle({"pid": 1, "actor_name": "RayTrainWorker",
            "lines": [HARMLESS_SAMPLES[0], "", "  ", KEPT_SAMPLES[0], HARMLESS_SAMPLES[4]]})
    handle({"pid": 2, "actor_name": "PlacementGroupCleaner", "lines": ["Traceback ..."]})
    handle({"pid": 3, "lines": [HARMLESS_SAMPLES[1]]})  # nothing left: nothing printed
    assert printed == [{"pid": 1, "actor_name": "RayTrainWorker", "lines": [KEPT_SAMPLES[0]]}]


def test_the_driver_filter_wraps_rays_printer_once_and_not_when_verbose():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed = []
    dispatcher.add_handler("ray_print_logs", printed.append)
    try:
        assert not console.filter_worker_logs(verbose=True)
        assert console.filter_worker_logs(verbose=False)
        assert console.filter_worker_logs(verbose=False)  # idempotent
        assert sum(name == "ray_print_logs" for name, _ in dispatcher.handlers) == 1
        dispatcher.emit({"pid": 1, "lines": [HARMLESS_SAMPLES[0], KEPT_SAMPLES[0]]})
        assert printed == [{"pid": 1, "lines": [KEPT_SAMPLES[0]]}]
    finally:
        dispatcher.remove_handler("ray_print_logs")


def test_the_logging_filter_drops_harmless_records():
    keep = logging.LogRecord("ray", logging.WARNING, "f", 1, KEPT_SAMPLES[1], None, None)
    drop = logging.LogRecord("ray", logging.WARNING, "f", 1,
                             "Token authentication is enabled for this Ray cluster. Set "
                             "RAY_AUTH_MODE=disabled to opt out.", None, None)
    assert console.HarmlessFilter().filter(keep)
    assert not console.HarmlessFilter().filter(drop)


def test_epoch_line_prefers_the_global_throughput():
    summary = {"epoch": 2, "step": 24, "loss": 1.00111, "samples_per_s": 200.0,
               "samples_per_s_total": 533.4, "data_wait_fraction": 0.103}
    assert console.epoch_line(summary, 5) == (
        "[mmcl] epoch 2/5  step 24  loss 1.0011  533 samples/s  data wait 10.3%")


def test_a_disabled_bar_does_nothing_and_an_enabled_one_counts_steps(capsys):
    off = console.EpochProgress(1, 3, total_steps=4, enabled=False)
    off.update({"loss": 1.0})
    off.close()
    on = console.EpochProgress(1, 3, total_steps=4, enabled=True)
    for _ in range(4):
        on.update({"loss": 0.5, "samples_per_s": 100.0, "data_wait_fraction": 0.1})
    assert on.bar.n == 4 and "loss 0.5000" in on.bar.desc
    on.close()
    assert capsys.readouterr().out == ""  # bars go to stderr, never stdout


def test_quiet_settings_reach_ray_train_ray_data_and_the_driver_and_verbose_undoes_them(
        monkeypatch):
    import ray.data

    # A fresh process's state: an earlier `pretrain` in this test process chose quiet.
    monkeypatch.setattr(console, "_verbose", True)

    from mmcl.cli import build_parser

    assert console.train_logging(verbose=False).log_level == "ERROR"
    assert console.train_logging(verbose=True).log_level == "INFO"
    assert console.is_verbose()  # a process that never chose (a Tune trial) shows all
    try:
        console.set_verbose(False)
        assert console.train_logging().log_level == "ERROR"
    finally:
        console.set_verbose(True)
    assert console.driver_init_kwargs(False) == {"logging_level": logging.WARNING}
    assert console.driver_init_kwargs(True) == {}
    context = ray.data.DataContext.get_current()
    before = (context.print_on_execution_start, context.enable_progress_bars)
    try:
        console.quiet_data(verbose=False)
        assert not context.print_on_execution_start and not context.enable_progress_bars
        console.quiet_data(verbose=True)
        assert context.print_on_execution_start
    finally:
        context.print_on_execution_start, context.enable_progress_bars = before
    args = build_parser().parse_args(["pretrain", "--verbose"])
    assert args.verbose and not build_parser().parse_args(["pretrain"]).verbose
