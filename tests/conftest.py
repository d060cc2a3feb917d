"""Shared test set-up: one torch thread, and one local Ray instance per test module."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Test tensors are tiny: extra intra-op threads only add contention (on a busy 2-core
    machine they made the critic and probe tests ~10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for one test module (each start costs seconds). 4 logical CPUs on a 2-core
    machine: Ray Data needs whole CPUs beside two 1-CPU training workers. address="local"
    never joins a cluster that another test started with `ray start`."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
