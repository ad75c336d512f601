"""Trials as Ray tasks: results in order, a worker's own exception re-raised as itself, silent addresses refused."""

from __future__ import annotations

import pytest

from qcompiler.distributed import ray_trials, serial_trials
from qcompiler.errors import QCompilerError


def _square_or_fail(value: int) -> int:
    if value < 0:
        raise KeyError(f"negative {value}")
    return value * value


def test_ray_runs_each_trial_as_a_task_in_order_and_reraises_a_workers_bug():
    with ray_trials() as on_ray:
        assert on_ray(_square_or_fail, []) == []
        assert on_ray(_square_or_fail, [3, 1, 2]) == serial_trials(_square_or_fail, [3, 1, 2]) == [9, 1, 4]
        with pytest.raises(KeyError, match="negative -1"):  # a bug in a trial reads as itself, not as Ray's wrapper
            on_ray(_square_or_fail, [2, -1])


@pytest.mark.parametrize("address, sentence", [
    ("127.0.0.1:1", "No Ray cluster answers at '127.0.0.1:1'"),
    ("ray://127.0.0.1:1", "No Ray cluster answers at 'ray://127.0.0.1:1'"),
    ("my-cluster", "is not host:port"),
])
def test_an_address_that_does_not_answer_is_one_sentence_at_once(address, sentence):
    with pytest.raises(QCompilerError, match=sentence):
        with ray_trials(address):
            pass
