import os
import sys

# The training scripts live at the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Under pytest-xdist (make test: two workers on two cores) each worker computes on one
# thread: two processes of two threads each on two cores slow each other down many times.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402


@pytest.fixture(scope="session")
def shapes_data_root(tmp_path_factory, worker_id):
    """A --data-root whose shapes_features/ holds the shapes classifier, trained once per
    test session and shared by every test that evaluates (under xdist, by every worker: the
    first to need it trains it, the others wait for it)."""
    import sample_quality

    if worker_id == "master":
        root = tmp_path_factory.mktemp("data")
        sample_quality.feature_space_for("shapes", root)
        return root
    root = tmp_path_factory.getbasetemp().parent / "data"  # the session's, shared by its workers
    with FileLock(f"{root}.lock"):
        sample_quality.feature_space_for("shapes", root)  # trains it, or loads what another trained
    return root
