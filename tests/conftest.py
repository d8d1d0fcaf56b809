import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray on 127.0.0.1 sized like a 2-core machine with 2 training workers."""
    import ray
    from ray.data import DataContext

    from pipelines.core.params import parse_params
    from pipelines.train import cluster

    cluster.connect(parse_params({"ray": {"num_workers": 2, "cpus_per_worker": 0.5, "data_cpus": 0.5}}).ray)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
