"""The synchronized batch-norm benchmark (normkit.bench_sync) compares two different things — a
local layer and a synchronized one over more than one rank — and counts what the synchronized
call sends: one collective of 3C float64 values per rank."""

from __future__ import annotations

import pytest

from normkit.bench_sync import layers_for, measure
from normkit.distributed.testing import ThreadGroup


def test_the_two_layers_compared_are_not_the_same_thing() -> None:
    results = ThreadGroup(2).run(lambda comm: layers_for(comm, 8))
    for local, synchronized, counting in results:
        assert local is not synchronized
        assert local.communicator is None
        assert synchronized.communicator is counting and counting.inner.size == 2


def test_one_collective_of_3c_doubles_per_call_and_both_timings() -> None:
    records = ThreadGroup(2).run(lambda comm: measure(comm, (4, 8, 3, 3), rounds=3))
    for record in records:
        assert record["collectives_per_call"] == 1.0
        assert record["bytes_sent_per_call"] == 3 * 8 * 8  # count, mean, M2 per channel, float64
        assert record["bytes_received_per_call"] == 2 * 3 * 8 * 8
        assert record["shard_shape"] == [2, 8, 3, 3] and record["ranks"] == 2
        assert record["local_ms"] > 0 and record["synchronized_ms"] > 0


def test_a_batch_that_does_not_split_is_refused() -> None:
    with pytest.raises(ValueError, match=r"the batch of 5 does not split evenly across 2 ranks"):
        ThreadGroup(2).run(lambda comm: measure(comm, (5, 8, 3, 3), rounds=1))
