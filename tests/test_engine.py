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
    with pytest.raises(NonFiniteLossError, match="train.nonfinite_loss=skip"):
        engine.train_step(batch)
    skipping = Engine(config.load(None, [*SMALL, "train.nonfinite_loss=skip"]), manifest, 4)
    before = [p.detach().clone() for p in skipping.objective.parameters()]
    assert skipping.train_step(batch) is None and skipping.skipped_batches == 1
    assert all(torch.equal(a, b) for a, b in zip(before, skipping.objective.parameters()))
