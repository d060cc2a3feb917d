"""The training step shared by every loop: schedules, checkpoint state, non-finite losses."""

import math

import pytest
import torch

from mmcl import config
from mmcl.data.synth import make_arrays
from mmcl.train.engine import Engine, NonFiniteLossError, warmup_cosine
from mmcl.train.local import memory_batches, steps_per_epoch
from mmcl.train.checkpoint import safe_load
from conftest import TINY_MODEL

SMALL = [*TINY_MODEL, "train.batch_size=32", "train.epochs=3", "objective.name=tuple_infonce",
         "model.encoder.dropout=0.1"]


@pytest.fixture(scope="module")
def data():
    return make_arrays("rus", 256, seed=0)


def run_epochs(engine, arrays, epochs):
    for epoch in range(engine.epoch, epochs):
        engine.train_epoch(memory_batches(arrays, engine.cfg.train.batch_size,
                                          engine.cfg.train.seed, epoch))


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(total_steps=10, warmup_steps=2, schedule="cosine")
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and f(10) == pytest.approx(0.0) and f(6) == pytest.approx(0.5)
    assert warmup_cosine(10, 0, "constant")(9) == 1.0


def test_resuming_from_saved_state_equals_training_straight_through(data, tmp_path):
    manifest, arrays = data
    cfg = config.load(None, SMALL)
    steps = steps_per_epoch(256, 32)
    straight = Engine(cfg, manifest, steps)
    run_epochs(straight, arrays, 3)

    first = Engine(cfg, manifest, steps)
    run_epochs(first, arrays, 2)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    torch.manual_seed(123)  # whatever the process did in between must not matter
    resumed = Engine(cfg, manifest, steps)
    resumed.load_state_dict(safe_load((tmp_path / "state.pt").read_bytes(), "state.pt"))
    run_epochs(resumed, arrays, 3)

    assert resumed.step == straight.step == 3 * steps
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    for (name, a), b in zip(straight.objective.state_dict().items(),
                            resumed.objective.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_nan_loss_fails_clearly_or_is_skipped(data):
    manifest, arrays = data
    batch = {k: torch.as_tensor(v[:32]) for k, v in arrays.items()}
    batch["a"] = batch["a"].clone()
    batch["a"][0, 0] = math.nan
    engine = Engine(config.load(None, SMALL), manifest, 4)
    with pytest.raises(NonFiniteLossError, match="became nan at step 0 .*train.nonfinite_loss=skip"):
        engine.train_epoch([batch])  # read when the step's metrics are: at the epoch's end
    skipping = Engine(config.load(None, [*SMALL, "train.nonfinite_loss=skip"]), manifest, 4)
    before = [p.detach().clone() for p in skipping.objective.parameters()]
    assert skipping.train_step(batch) is None and skipping.skipped_batches == 1
    assert all(torch.equal(a, b) for a, b in zip(before, skipping.objective.parameters()))


def test_max_steps_ends_the_run_mid_epoch_with_the_schedule_at_its_end(data):
    from mmcl.train.local import fit_in_memory

    manifest, arrays = data
    cfg = config.load(None, [*SMALL, "train.max_steps=10", "train.warmup_epochs=0"])
    engine = fit_in_memory(cfg, manifest, arrays)  # 8 steps per epoch, 3 epochs allowed
    assert engine.step == 10 and engine.finished
    assert [h["steps"] for h in engine.history] == [8, 2]
    assert engine.lr == pytest.approx(0.0, abs=1e-12)


def test_a_mid_epoch_tally_in_the_state_gives_the_straight_epoch_summary(data, tmp_path):
    """Stopped after 3 of an epoch's 8 batches, saved and resumed on the remaining batches,
    the epoch reports the steps and mean loss of the whole epoch."""
    manifest, arrays = data
    cfg = config.load(None, SMALL)
    steps = steps_per_epoch(256, 32)
    batches = list(memory_batches(arrays, 32, 0, 0))
    straight = Engine(cfg, manifest, steps)
    whole = straight.train_epoch(batches)

    first = Engine(cfg, manifest, steps)
    for batch in batches[:3]:  # the state after 3 batches, as a step checkpoint holds it
        first.tally.add(first.train_step(batch), len(next(iter(batch.values()))))
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = Engine(cfg, manifest, steps)
    resumed.load_state_dict(safe_load((tmp_path / "state.pt").read_bytes(), "state.pt"))
    assert resumed.tally.batches == 3 and resumed.epoch == 0
    part = resumed.train_epoch(batches[3:])
    assert part["steps"] == whole["steps"] == 8 and part["step"] == 8
    assert part["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_the_epoch_stream_runs_ahead_across_epochs_and_keeps_order_and_errors():
    import threading

    from mmcl.data.pipeline import EpochStream

    opened = {e: threading.Event() for e in range(3)}

    def open_epoch(epoch):
        opened[epoch].set()
        for i in range(3):
            if epoch == 2 and i == 1:
                raise ValueError("broken shard")
            yield f"{epoch}.{i}"

    stream = EpochStream(open_epoch, [0, 1, 2], skip=1, ahead=4)
    first = stream.epoch(0)
    assert next(first) == (1, "0.1")  # batch 0 of the resumed epoch is skipped
    # Epoch 1 starts while epoch 0 still has a batch to train.
    assert opened[1].wait(timeout=60)
    assert list(first) == [(2, "0.2")]
    assert list(stream.epoch(1)) == [(0, "1.0"), (1, "1.1"), (2, "1.2")]
    third = stream.epoch(2)
    assert next(third) == (0, "2.0")
    with pytest.raises(ValueError, match="broken shard"):
        next(third)
    stream.close()


@pytest.mark.parametrize("name, views", [("cross", 1), ("cross", 2), ("cross_self", 2),
                                         ("tuple_infonce", 2), ("comm", 2)])
def test_a_step_encodes_each_modality_once_per_view_the_objective_declares(data, name, views):
    """The view count is the objective's declaration: a one-view objective (cross, CLIP's
    recipe, by default) runs every encoder once per step, not twice."""
    manifest, arrays = data
    extra = [f"objective.views={views}"] if name == "cross" else []
    engine = Engine(config.load(None, [*SMALL, f"objective.name={name}", *extra]), manifest, 4)
    assert engine.objective.num_views == views
    calls = {m: 0 for m in manifest.modality_names}
    for m, encoder in engine.objective.encoder.encoders.items():
        encoder.register_forward_hook(lambda *_, m=m: calls.__setitem__(m, calls[m] + 1))
    engine.train_step(next(memory_batches(arrays, 32, 0, 0)))
    assert calls == {m: views for m in manifest.modality_names}


def test_metrics_are_read_from_the_device_only_when_logged(data):
    """A step returns tensors (no host sync); the epoch's summary and every log call carry
    numbers, the log every tracking.every_n_steps steps and at the epoch's end."""
    manifest, arrays = data
    engine = Engine(config.load(None, [*SMALL, "tracking.every_n_steps=3"]), manifest, 8)
    logged = []
    engine.on_log = logged.append
    assert isinstance(engine.train_step(next(memory_batches(arrays, 32, 0, 0)))["loss"],
                      torch.Tensor)
    summary = engine.train_epoch(memory_batches(arrays, 32, 0, 1))
    assert [m["step"] for m in logged] == [3, 6, 9]
    assert [m["steps"] for m in logged] == [2, 3, 3]  # the first step was taken by hand
    assert all(isinstance(m["loss"], float) for m in logged)
    assert isinstance(summary["loss"], float) and summary["steps"] == 8
