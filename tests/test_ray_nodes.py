"""Stages on several nodes: a Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster, two raylets of one
CPU each), a two-stage bundle placed strict-spread, so each stage's actor runs on its own node; the same greedy
tokens as the one graph; stages asking more CPUs than a node has are one clear error."""

from __future__ import annotations

import pytest

import edgellm
from edgellm.errors import EdgeLLMError

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'edgellm[ray]')")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_each_stage_runs_on_its_own_node(two_nodes, tiny, tmp_path, monkeypatch):
    from edgellm.runtime import ray_stages

    _, folder = tiny("llama")
    options = dict(quantize="f32", seq_length=128, chunk_length=8, progress=False)
    whole = edgellm.load(edgellm.convert(folder, tmp_path / "whole", **options))
    split = edgellm.convert(folder, tmp_path / "split", num_devices=2, **options)
    model = edgellm.load(split, stage_placement="strict-spread", slots=2)
    nodes = model.engine.remote.nodes
    assert len(set(nodes)) == 2, nodes
    greedy = dict(max_new_tokens=24, ignore_eos=True)
    for prompt in ("Four score and seven", [{"role": "user", "content": "We hold these truths"}]):
        assert model.generate(prompt, **greedy).token_ids == whole.generate(prompt, **greedy).token_ids
    model.close()
    monkeypatch.setattr(ray_stages, "PLACEMENT_WAIT_S", 3.0)
    with pytest.raises(EdgeLLMError, match=r"no room for 2 stages of 2 CPU\(s\) each .* 2 node\(s\)"):
        edgellm.load(split, stage_placement="strict-spread", threads=2)  # each node has one
