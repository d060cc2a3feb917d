"""Pretraining on local Ray end to end: Ray Data -> 2 Ray Train workers -> a run folder that
mmcl.load opens without Ray; rerunning resumes; a worker that dies is restarted from its last
checkpoint."""

import json
import os

import pytest
import torch

import mmcl
from mmcl import config
from mmcl.data.shards import read_split
from mmcl.objectives import OBJECTIVES
from mmcl.train import launcher, tracking

ray = pytest.importorskip("ray")
pytest.importorskip("ray.train")  # `ray.train.TrainingFailedError` below, also when run alone
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]

TINY = ["data.synth.n=400", "train.batch_size=32", "train.warmup_epochs=0",
        "model.embed_dim=16", "model.encoder.hidden=16", "model.proj_hidden=16",
        "model.proj_dim=16", "model.fusion_heads=2", "scaling.num_workers=2",
        "train.checkpoint_every=1"]



def tiny_config(tmp_path, *extra):
    return config.load(None, [*TINY, f"storage.path={tmp_path}", *extra])


def read_metrics(run_url):
    with open(os.path.join(run_url, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_pretrain_writes_a_run_that_loads_without_ray_and_resumes(tmp_path):
    cfg = tiny_config(tmp_path, "storage.name=demo", "train.epochs=2",
                      "objective.name=tuple_infonce", "tracking.every_n_steps=1")
    result = launcher.pretrain(cfg)
    metrics = read_metrics(result.run_url)
    assert [m["epoch"] for m in metrics] == [1, 2]
    # TensorBoard (the default tracker) from rank 0: every step and every epoch.
    curves = tracking.read_scalars(os.path.join(result.run_url, "tensorboard"))
    assert [s for s, _ in curves["train/loss"]] == list(range(1, metrics[-1]["step"] + 1))
    assert [s for s, _ in curves["epoch/loss"]] == [m["step"] for m in metrics]
    for key in ("loss", "lr", "samples_per_s", "samples_per_s_total", "data_wait_fraction"):
        assert key in metrics[-1], key
    assert metrics[-1]["samples_per_s_total"] > metrics[-1]["samples_per_s"]

    model = mmcl.load(result.model_url)
    root = launcher.resolve_data(cfg)
    batch = {k: torch.as_tensor(v[:8]) for k, v in read_split(root, "test").items()}
    assert model.embed(batch).shape == (8, 16)
    assert set(model.modality_embeddings(batch)) == set(model.manifest.modality_names)
    assert config.load(os.path.join(result.run_url, "config.yaml")).train.epochs == 2

    # Same storage path and name, more epochs: the run goes on from its checkpoint.
    longer = tiny_config(tmp_path, "storage.name=demo", "train.epochs=3",
                         "objective.name=tuple_infonce")
    resumed = launcher.pretrain(longer)
    again = read_metrics(resumed.run_url)
    assert [m["epoch"] for m in again] == [1, 2, 3]
    assert again[:2] == metrics, "resuming retrained the finished epochs"


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_trains_on_two_workers(tmp_path, name):
    preset = "factorcl" if name.startswith("factorcl") else "rus"
    cfg = tiny_config(tmp_path, f"objective.name={name}", f"data.synth.preset={preset}",
                      "data.synth.n=600", "train.epochs=3", "train.lr=3e-3",
                      "train.checkpoint_every=3")
    result = launcher.pretrain(cfg)
    losses = [m["loss"] for m in read_metrics(result.run_url)]
    assert len(losses) == 3 and losses[-1] < losses[0], f"{name}: {losses}"


def dying_loop(at_epoch):
    """mmcl's worker loop, except that a run's first attempt dies when it starts epoch
    `at_epoch` (after the checkpoint of the epoch before). Restarted workers are fresh
    processes, so the patch does not follow them."""

    def loop(loop_config):
        import ray.train

        from mmcl.train import worker

        if ray.train.get_checkpoint() is None:
            real = worker.Engine.train_epoch

            def train_epoch(self, batches):
                if self.epoch == at_epoch:
                    raise RuntimeError("injected worker failure")
                return real(self, batches)

            worker.Engine.train_epoch = train_epoch
        return worker.train_loop_per_worker(loop_config)

    return loop


def test_a_killed_run_resumes_at_its_checkpoint_when_rerun(tmp_path):
    cfg = tiny_config(tmp_path, "storage.name=killed", "train.epochs=2", "objective.name=tuple",
                      "scaling.max_failures=0")
    root, manifest = launcher.prepare_data(cfg)
    steps = launcher.train_steps(cfg, manifest, cfg.scaling.num_workers)
    with pytest.raises(ray.train.TrainingFailedError, match="injected worker failure"):
        launcher.make_trainer(cfg, root, manifest, steps, "killed", loop=dying_loop(1)).fit()

    result = launcher.pretrain(cfg)
    history = read_metrics(result.run_url)
    assert [h["epoch"] for h in history] == [1, 2]
    assert [h["resumed_from_step"] for h in history] == [0, steps]
    assert history[-1]["step"] == 2 * steps


def test_a_failed_worker_is_restarted_from_the_last_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, "storage.name=flaky", "train.epochs=3", "objective.name=tuple",
                      "scaling.max_failures=1")
    root, manifest = launcher.prepare_data(cfg)
    steps = launcher.train_steps(cfg, manifest, cfg.scaling.num_workers)

    result = launcher.make_trainer(cfg, root, manifest, steps, "flaky",
                                   loop=dying_loop(1)).fit()
    assert result.error is None
    history = result.return_value
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert result.metrics["epoch"] == 3
    assert history[1]["resumed_from_step"] == steps  # epoch 2 ran after the restart


def test_too_small_a_cluster_is_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path, "scaling.num_workers=8")
    with pytest.raises(launcher.LaunchError, match="scaling.num_workers"):
        launcher.pretrain(cfg)
