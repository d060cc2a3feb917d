"""mmcl.cluster: one way to start or join Ray, the CPU/GPU budget it checks, and the
placement-group janitor that stands in for Ray Train's own cleaner on local Ray (see the
module doc of mmcl/cluster.py for why that cleaner does not run there)."""

from types import SimpleNamespace

import pytest

from mmcl import config
from mmcl.cluster import LaunchError, _jobs_that_fit, connect



def test_the_budget_counts_cpus_gpus_and_concurrent_jobs():
    fit = {"job": "trial", "cost": "2 workers x 1 CPU + 1 for Ray Data", "advice": "add nodes",
           "error": LaunchError}
    assert _jobs_that_fit(8, 0, 3, None, 0, **fit) == 2          # as many as fit
    assert _jobs_that_fit(8, 0, 3, 1, 0, **fit) == 1
    assert _jobs_that_fit(8, 4, 3, None, 2, **fit) == 2          # GPUs bound it too
    with pytest.raises(LaunchError, match=r"has 2 CPUs; one trial needs 2 workers x 1 CPU "
                       r"\+ 1 for Ray Data = 3 CPUs\. add nodes"):
        _jobs_that_fit(2, 0, 3, 1, 0, **fit)
    with pytest.raises(LaunchError, match="3 concurrent trials need 9 CPUs"):
        _jobs_that_fit(8, 0, 3, 3, 0, **fit)
    with pytest.raises(LaunchError, match="has 1 GPUs; one trial needs 2"):
        _jobs_that_fit(8, 1, 3, 1, 2, **fit)


@pytest.mark.ray
@pytest.mark.usefixtures("local_ray")
def test_connect_uses_the_ray_already_running_and_refuses_a_run_that_does_not_fit():
    from mmcl.train import launcher

    assert connect(None, 2, concurrent=None) == 2                # local_ray has 4 CPUs
    big = config.from_dict({"scaling": {"num_workers": 4}})
    with pytest.raises(LaunchError, match="one run needs 4 workers x 1 CPU \\+ 1 for Ray "
                       "Data = 5 CPUs. Lower scaling.num_workers"):
        launcher.start_ray(big, None)
    gpu = config.from_dict({"scaling": {"num_workers": 1, "use_gpu": True}})
    with pytest.raises(LaunchError, match="scaling.use_gpu is on but the Ray cluster has 0"):
        launcher.start_ray(gpu, None)


@pytest.mark.ray
@pytest.mark.usefixtures("local_ray")
def test_the_janitor_removes_the_placement_groups_of_ended_trials_only(tmp_path):
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from mmcl.tune.trial import make_janitor

    records = tmp_path / "_placement_groups"
    records.mkdir()
    groups = {}
    for trial_id in ("ended", "running"):
        groups[trial_id] = placement_group([{"CPU": 1}])
        ray.get(groups[trial_id].ready(), timeout=60)
        (records / f"{trial_id}.{groups[trial_id].id.hex()}").write_text("")
    janitor = make_janitor(str(records), config.from_dict({}))
    janitor.on_trial_complete(0, [], SimpleNamespace(trial_id="ended"))
    janitor.sweep()
    assert placement_group_table(groups["ended"])["state"] == "REMOVED"
    assert placement_group_table(groups["running"])["state"] == "CREATED"
    assert [p.name for p in records.iterdir()] == [f"running.{groups['running'].id.hex()}"]
    ray.util.remove_placement_group(groups["running"])


def test_a_local_storage_path_is_refused_on_more_than_one_node_unless_marked_shared(
        monkeypatch, tmp_path):
    ray = pytest.importorskip("ray")

    from mmcl.train.launcher import check_storage_reachable

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True},
                                               {"Alive": False}])
    local = {"path": str(tmp_path)}
    with pytest.raises(LaunchError, match=r"is a local folder, but the Ray cluster has 2 "
                       r"nodes: .* set storage.shared=true"):
        check_storage_reachable(config.from_dict({"storage": local}))
    check_storage_reachable(config.from_dict({"storage": {**local, "shared": True}}))
    check_storage_reachable(config.from_dict({"storage": {"path": "s3://b/runs"}}))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    check_storage_reachable(config.from_dict({"storage": local}))   # one node: fine
