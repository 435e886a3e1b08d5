import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


@pytest.fixture
def root() -> Path:
    return ROOT


def pytest_collection_finish(session):
    """Start the warm zygote of the integration tests (tests/integration/warm.py) now, so its imports overlap the
    unit tests instead of delaying the first training launch."""
    if any("integration" in item.nodeid.split("/")[:2] for item in session.items):
        from tests.integration import helpers, warm

        warm.prestart(helpers.env())
