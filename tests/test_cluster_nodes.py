"""A sweep on a Ray cluster of several nodes that loses one (``ray.cluster_utils.Cluster``:
real raylets on this machine). The run on the lost node is requeued on another node,
resumes from the files it shipped, and the sweep ends equal to the local pool's."""

from __future__ import annotations

import json
from typing import Any

import pytest
import test_cluster
from test_cluster import comparable, same_models, spec

from dana.experiments import cluster
from dana.experiments.cluster import ClusterOptions
from dana.experiments.sweep import run_sweep

#: The reference, the same grid in the local pool (the fixture of test_cluster.py).
local_sweep = test_cluster.local_sweep


@pytest.fixture(scope="module")
def nodes():
    """A head node without CPUs (the driver and its mailbox only) and one worker node:
    every run's task has to go to a worker node."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another module's local instance: this test needs its own
        ray.shutdown()
    cluster_ = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            # Find the dead node within a few seconds, not Ray's default ~30 s.
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5},
        },
    )
    cluster_.add_node(num_cpus=1)
    yield cluster_
    ray.shutdown()
    cluster_.shutdown()


@pytest.mark.ray
def test_the_mailbox_stays_on_the_driver_s_node(nodes):
    # On the worker node it would die with it and end the sweep. A soft affinity put it
    # there about one time in three on this setup.
    import ray

    here = ray.get_runtime_context().get_node_id()
    for _ in range(6):
        mailbox = cluster._start_mailbox(ray, {})
        where = mailbox.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())
        assert ray.get(where) == here
        ray.kill(mailbox)


@pytest.mark.ray
def test_a_lost_node_s_run_is_requeued_on_another_node_and_resumes(
    nodes, local_sweep, tmp_path, monkeypatch
):
    # Once the first run has shipped epoch 1, its node is killed (raylet and worker
    # processes, no graceful exit) and a fresh node joins: Ray retries the task there, it
    # resumes from the shipped checkpoint (epoch 1 not redone), the second run follows.
    lost: list[str] = []
    first: dict[str, Any] = {}
    deliver = cluster._deliver

    def watch(ray: Any, mailbox: Any) -> dict[str, int]:
        attempts = deliver(ray, mailbox)
        if not lost:
            for path in sorted(tmp_path.rglob("result.json")):
                result = json.loads(path.read_text())
                epochs = result["epochs"]
                if epochs and not result["finished"]:  # a finished run would not be requeued
                    lost.append(str(path.parent.relative_to(tmp_path)))
                    first["epoch"] = epochs[0]
                    (worker,) = nodes.worker_nodes
                    nodes.remove_node(worker, allow_graceful=False)
                    nodes.add_node(num_cpus=1)
                    break
        return attempts

    monkeypatch.setattr(cluster, "_deliver", watch)
    options = ClusterOptions(None, cpus_per_run=1, max_requeues=2)
    summary = run_sweep(spec(), tmp_path, cluster=options, progress=False, poll_seconds=0.1)
    assert lost, "no run shipped an epoch before the sweep ended"
    assert summary.requeued == [tmp_path / lost[0]]
    assert len(summary.finished) == 2 and not summary.failed
    assert comparable(tmp_path) == comparable(local_sweep)
    assert same_models(tmp_path, local_sweep)
    epochs = json.loads((tmp_path / lost[0] / "result.json").read_text())["epochs"]
    assert epochs[0] == first["epoch"]  # timing included: epoch 1 was not redone
