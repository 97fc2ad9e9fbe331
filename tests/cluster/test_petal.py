"""The `petal` command against the test bed for what is not there. (Its verbs on a real job — list and
status while it runs, logs followed across recreated masters, collect, cancel — look on at the
ExitCode fault scenario in test_faults.py, and on a TrainJob in test_trainer_v2.py.)"""

from __future__ import annotations

from conftest import PETAL_NAMESPACE


def test_petal_says_one_line_for_a_job_that_is_not_there(cluster):
    for verb in (["status", "no-such-job"], ["logs", "no-such-job"], ["cancel", "no-such-job"],
                 ["collect", "no-such-job"]):  # fmt: skip
        result = cluster.petal(*verb, check=False)
        assert result.returncode == 5 and result.stderr.strip() == (
            f"petal: error: no petal job 'no-such-job' in namespace '{PETAL_NAMESPACE}'"
        )
