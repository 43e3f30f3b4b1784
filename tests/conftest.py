import os

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Object storage in the tests is a moto S3 server on 127.0.0.1 (tests/pipeline/test_object_storage.py).
# Set here, at import, so that every process of the session has them, the session's Ray
# workers included (they inherit this environment when Ray starts, as a cluster's nodes
# have theirs): dummy credentials and a region, so that no AWS SDK client looks for them
# anywhere, and no cloud metadata lookup (169.254.169.254) in any case.
for _k, _v in {
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_ACCESS_KEY_ID": "pairforge-test",
    "AWS_SECRET_ACCESS_KEY": "pairforge-test",
    "AWS_REGION": "us-east-1",
}.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (2 CPUs, like CI), started as
    pairforge starts it: nothing leaves loopback (pipeline/raystart.py)."""
    import ray

    from pairforge.pipeline.raystart import init_local

    if not ray.is_initialized():
        init_local(num_cpus=2, ignore_reinit_error=True, log_to_driver=False)
    yield ray


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``pairforge demo --runner local`` (every stage, in process, no Ray), run
    once a session as a user runs it: ``(exit code, the run's folder)``. Tests
    that change the run copy it first."""
    from pairforge.cli import main

    out = tmp_path_factory.mktemp("demo")
    rc = main(["demo", "--out", str(out), "--runner", "local"])
    return rc, out / "run"
