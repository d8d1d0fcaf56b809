"""Fixtures shared by every part of the suite, and the e2e marker.

Tests are laid out like the packages (tests/core, tests/data, tests/train, ...); helpers
that several parts use live in tests/support/ and are imported as `support.<module>`,
never from another test file. Everything under tests/e2e/ is marked `e2e`, so
`pytest -m "not e2e"` is the quick loop; `make test` and CI run everything.
"""
from pathlib import Path

import pytest

E2E_DIR = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


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
