import os

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (2 CPUs, like CI), started as
    pairforge starts it: nothing leaves loopback (pipeline/raystart.py)."""
    import ray

    from pipeline.raystart import init_local

    if not ray.is_initialized():
        init_local(num_cpus=2, ignore_reinit_error=True, log_to_driver=False)
    yield ray
