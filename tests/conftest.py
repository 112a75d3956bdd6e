import os
import sys

# The training scripts live at the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shapes_data_root(tmp_path_factory):
    """A --data-root whose shapes_features/ holds the shapes classifier, trained once per
    test session (about a minute on one core) and shared by every test that evaluates."""
    import sample_quality

    root = tmp_path_factory.mktemp("data")
    sample_quality.feature_space_for("shapes", root)
    return root
