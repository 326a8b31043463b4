"""The job environment: the rule's thread count reaches numpy's BLAS, which was loaded before the job."""

from types import SimpleNamespace

import numpy  # noqa: F401  (loaded first, as in every workflow script)
from threadpoolctl import threadpool_info

from layerscope.jobs.runtime import job


def _blas_threads():
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_the_rules_thread_count_limits_numpys_blas_during_the_job(tmp_path):
    before = _blas_threads()
    fake = SimpleNamespace(threads=1, log=[str(tmp_path / "job.log")], rule="probe")
    with job(fake):
        assert _blas_threads() and all(n == 1 for n in _blas_threads())
    assert _blas_threads() == before
