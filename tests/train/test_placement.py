"""Where a stage's workers go: ray.placement_strategy, and the check that the alive nodes can hold them.

pipelines.train.cluster.check_placement is given the nodes' resources as Ray reports them
(ray.nodes()[i]["Resources"]); tests/e2e/test_cluster.py runs it against a real
cluster of two nodes, before training and after one is lost.
"""
import pytest

from pipelines.core.params import ParamsError, parse_params
from pipelines.train.cluster import ClusterError, check_placement
from pipelines.train.recipe import RESULT_PARAMS


def ray_params(**knobs):
    return parse_params({"ray": {"num_workers": 2, "cpus_per_worker": 1.0, **knobs}}).ray


def test_placement_strategy_is_one_of_rays_and_decides_no_result():
    assert ray_params().placement_strategy == "PACK"
    assert ray_params(placement_strategy="STRICT_SPREAD").placement_strategy == "STRICT_SPREAD"
    with pytest.raises(ParamsError, match="ray.placement_strategy = 'spread': must be one of 'PACK', 'SPREAD'"):
        ray_params(placement_strategy="spread")
    assert not any(key.startswith("ray.placement") for key in RESULT_PARAMS)


TWO_NODES = [{"CPU": 2.0, "memory": 1e9}, {"CPU": 1.0, "object_store_memory": 2e8}]


@pytest.mark.parametrize("strategy, workers, fits", [
    # PACK and SPREAD bend: any node with room takes a worker (2 + 1 of 1 CPU each).
    ("PACK", 3, True), ("SPREAD", 3, True), ("SPREAD", 4, False),
    # STRICT_PACK: all on one node, the larger holds 2.
    ("STRICT_PACK", 2, True), ("STRICT_PACK", 3, False),
    # STRICT_SPREAD: a node each.
    ("STRICT_SPREAD", 2, True), ("STRICT_SPREAD", 3, False),
])
def test_what_fits_depends_on_the_strategy(strategy, workers, fits):
    params = ray_params(placement_strategy=strategy, num_workers=workers)
    if fits:
        check_placement(params, TWO_NODES)
    else:
        with pytest.raises(ClusterError):
            check_placement(params, TWO_NODES)


def test_the_message_says_what_is_missing_and_what_to_do():
    with pytest.raises(ClusterError) as err:
        check_placement(ray_params(placement_strategy="STRICT_SPREAD", cpus_per_worker=0.5), [{"CPU": 2.0}])
    assert str(err.value) == (
        "ray.placement_strategy STRICT_SPREAD puts each of the 2 workers, 0.5 CPU each, on a node of its own; "
        "the Ray cluster has 1 alive node (2 CPU), room for 1 that way: add nodes, use SPREAD, or fewer workers "
        "(ray.num_workers)")
    # A GPU per worker: nodes without GPUs hold none, however many CPUs they have.
    gpu = ray_params(use_gpu=True, num_workers=2)
    with pytest.raises(ClusterError, match=r"need 1 CPU \+ 1 GPU each; the Ray cluster has 2 alive nodes "
                                           r"\(8 CPU, 1 GPU; 8 CPU\), room for 1: add nodes"):
        check_placement(gpu, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0}])
    check_placement(gpu, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}])
    # Fractions of a CPU add up as Ray counts them: 3 x 1/3 fit in 1 CPU.
    check_placement(ray_params(placement_strategy="STRICT_PACK", num_workers=3, cpus_per_worker=1 / 3),
                    [{"CPU": 1.0}])
