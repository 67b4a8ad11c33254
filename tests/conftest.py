import os

# Tests never reach the network: hub lookups must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """One model cache per test session, so no test depends on what an earlier run left."""
    os.environ["BEAM_EXTRACT_CACHE"] = str(tmp_path_factory.mktemp("beam_extract_cache"))
