import os
import sys

# The training scripts live at the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Under pytest-xdist (make test: two workers on two cores) each worker computes on one
# thread: two processes of two threads each on two cores slow each other down many times.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shapes_data_root(tmp_path_factory, worker_id):
    """A --data-root shared by every test of the session (under xdist, by its workers), so that
    the real features cached there are computed once."""
    if worker_id == "master":
        return tmp_path_factory.mktemp("data")
    root = tmp_path_factory.getbasetemp().parent / "data"  # the session's, shared by its workers
    root.mkdir(exist_ok=True)
    return root
