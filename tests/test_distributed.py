"""Synchronized batch norm, engine-neutral (normkit.distributed), on ranks simulated by threads
(normkit.distributed.testing.ThreadGroup): every rank's output against the float64 reference on
the concatenated batch, running statistics bit-identical on every rank and equal to one process
on the whole batch; empty ranks, masks, a global single value, faults that must be errors on
every rank (never hangs), and eval that never communicates."""

from __future__ import annotations

import numpy as np
import pytest

import normkit
from normkit import reference
from normkit.distributed import CommunicatorError, synchronized_moments
from normkit.distributed.testing import ThreadGroup
from normkit.testing.distributed import bn_state, output_bound, parts_of
from normkit.testing.tolerances import (
    statistics_tolerance,
)

SIZES = {"unequal": (1, 7, 64, 200), "one-empty": (0, 5, 11)}


def train_each_rank(parts: list[np.ndarray], steps: int = 2, **options: object) -> list[tuple]:
    """Every rank's last output and state after ``steps`` training calls on its part."""

    def rank(comm: object) -> tuple:
        bn = normkit.BatchNorm(3, communicator=comm, **options)
        bn.load_state_dict(bn_state())
        for _ in range(steps):
            y = bn(parts[comm.rank])
        return y, bn.running_mean, bn.running_var, bn.num_batches_tracked

    return ThreadGroup(len(parts)).run(rank)


@pytest.mark.parametrize("dtype, loc", [("float32", 0.5), ("float32", 1e4), ("float16", 3.0)])
@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
def test_every_rank_normalizes_with_the_global_batch(sizes: tuple[int, ...], dtype: str, loc: float) -> None:
    parts = parts_of(sizes, loc, dtype)
    results = train_each_rank(parts)
    state = bn_state()
    # running statistics: the same bits on every rank
    for _, mean, var, counter in results[1:]:
        assert np.array_equal(mean, results[0][1]) and np.array_equal(var, results[0][2])
        assert counter == results[0][3] == 2
    # against the float64 reference on the concatenated batch, two steps
    whole = np.concatenate(parts)
    rm, rv = (np.asarray(state[k], np.float64) for k in ("running_mean", "running_var"))
    w = np.asarray(state["weight"], np.float64)
    for _ in range(2):
        y_ref, rm, rv = reference.batch_norm(
            whole,
            w,
            state["bias"],
            rm,
            rv,
            training=True,
            momentum=0.1,
            eps=1e-5,
            axis=1,
            unbiased_running_var=True,
        )
    magnitude = float(np.abs(whole.astype(np.float64)).max())
    steps = 2
    for got, expected, statistic in ((results[0][1], rm, "mean"), (results[0][2], rv, "var")):
        tolerance = statistics_tolerance(dtype, statistic, magnitude)
        np.testing.assert_allclose(got, expected, rtol=steps * tolerance.rtol, atol=steps * tolerance.atol)
    count, mu, m2 = reference.moments(whole, (0, 2), None)
    y = np.concatenate([r[0] for r in results]).astype(np.float64)
    assert y.dtype == np.float64 and results[0][0].dtype == np.dtype(dtype)
    bound = output_bound(whole.astype(np.float64), y_ref, mu, m2 / count, w, dtype)
    assert np.all(np.abs(y - y_ref) <= bound)
    # and one process on the whole batch: the same running statistics within both tolerances
    single = normkit.BatchNorm(3)
    single.load_state_dict(state)
    for _ in range(2):
        single(whole)
    tolerance = statistics_tolerance(dtype, "mean", magnitude).pairwise()
    np.testing.assert_allclose(
        results[0][1], single.running_mean, rtol=steps * tolerance.rtol, atol=steps * tolerance.atol
    )


def test_moments_merge_in_rank_order_to_the_same_bits_everywhere() -> None:
    parts = parts_of((3, 0, 50, 2), 1e4, "float32", seed=3)
    results = ThreadGroup(4).run(
        lambda comm: synchronized_moments(normkit.moments(parts[comm.rank], axis=1), comm, layer="bn")
    )
    whole = np.concatenate(parts)
    count, mean, m2 = reference.moments(whole, (0, 2), None)
    for r in results:
        assert all(np.array_equal(a, b) for a, b in zip(r, results[0], strict=True))
    np.testing.assert_array_equal(results[0].count, count)
    magnitude = float(np.abs(whole).max())
    tol = statistics_tolerance("float32", "mean", magnitude)
    np.testing.assert_allclose(results[0].mean, mean, **tol.kwargs)
    vt = statistics_tolerance("float32", "var", magnitude)
    np.testing.assert_allclose(results[0].m2 / count, m2 / count, **vt.kwargs)


def test_masks_select_values_on_every_rank() -> None:
    rng = np.random.default_rng(5)
    parts = parts_of((4, 6), 2.0, "float32", seed=5)
    masks = [rng.random(p.shape) < 0.6 for p in parts]

    def rank(comm: object) -> tuple:
        bn = normkit.BatchNorm(3, communicator=comm)
        bn.load_state_dict(bn_state())
        return bn(parts[comm.rank], mask=masks[comm.rank]), bn.running_mean, bn.running_var

    results = ThreadGroup(2).run(rank)
    single = normkit.BatchNorm(3)
    single.load_state_dict(bn_state())
    single(np.concatenate(parts), mask=np.concatenate(masks))
    tolerance = statistics_tolerance("float32", "var", 2.0 + 6.0).pairwise()
    np.testing.assert_allclose(results[0][2], single.running_var, **tolerance.kwargs)
    np.testing.assert_array_equal(results[0][2], results[1][2])


def test_all_ranks_empty_leave_the_running_statistics_and_counter_alone() -> None:
    results = train_each_rank([np.zeros((0, 3, 4), np.float32)] * 3, steps=1)
    state = bn_state()
    for y, mean, var, counter in results:
        assert y.shape == (0, 3, 4)
        np.testing.assert_array_equal(mean, state["running_mean"])
        np.testing.assert_array_equal(var, state["running_var"])
        assert counter == 0


def test_a_global_single_value_is_refused_on_every_rank_unless_the_preset_allows_it() -> None:
    parts = [np.ones((1, 3), np.float32), np.zeros((0, 3), np.float32)]
    group = ThreadGroup(2)
    with pytest.raises(ValueError, match=r"the global batch over threads .* has 1 value per channel"):
        group.run(lambda comm: normkit.BatchNorm(3, communicator=comm)(parts[comm.rank]))
    assert all(isinstance(e, ValueError) for e in group.errors)
    ys = ThreadGroup(2).run(
        lambda comm: normkit.BatchNorm(3, communicator=comm, preset="keras")(parts[comm.rank])
    )
    np.testing.assert_array_equal(ys[0], np.zeros((1, 3), np.float32))  # y = beta


def test_mismatched_channels_are_an_error_on_every_rank() -> None:
    parts = [np.ones((2, 3), np.float32), np.ones((2, 4), np.float32)]
    group = ThreadGroup(2, timeout=5.0)
    with pytest.raises(
        ValueError, match=r"disagree on the input's layout \(rank 0: 3 channels, float32, rank 1: 4"
    ):
        group.run(lambda comm: normkit.BatchNorm(communicator=comm)(parts[comm.rank]))
    assert all(isinstance(e, ValueError) and "disagree" in str(e) for e in group.errors)


def test_a_rank_that_skips_the_collective_leaves_the_others_with_a_timeout_error() -> None:
    def rank(comm: object) -> object:
        bn = normkit.BatchNorm(3, communicator=comm)
        if comm.rank == 1:
            bn.eval()  # in eval while the others train: it never joins
        return bn(np.ones((2, 3), np.float32))

    group = ThreadGroup(2, timeout=0.5)
    with pytest.raises(
        CommunicatorError, match=r"layer 'BatchNorm\(3\)': the layout check over threads .* failed on rank 0"
    ):
        group.run(rank)


def test_eval_never_communicates() -> None:
    class Refusing:
        engine, rank, size = "nothing", 0, 2

        def all_gather(self, arrays: object) -> object:
            raise AssertionError("eval communicated")

        all_gather_ints = all_gather

    bn = normkit.BatchNorm(3, communicator=Refusing())
    bn.load_state_dict(bn_state())
    bn.eval()(np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match="communicator is a int without all_gather"):
        normkit.BatchNorm(3, communicator=3)


@pytest.mark.parametrize("estimator", ["population", "batch-average"])
def test_recalibration_over_shards_equals_one_process_over_the_whole_data_set(estimator: str) -> None:
    """Each rank recalibrates on its shard (one shard empty); every rank stores the statistics
    one process would store from every batch, the same bits on every rank."""
    from normkit.testtime import recalibrate

    rng = np.random.default_rng(8)
    batches = [rng.normal(3.0, 2.0, size=(n, 3, 4)).astype(np.float32) for n in (2, 9, 4, 30, 5)]
    shards = [batches[:2], [], batches[2:]]

    def layers() -> dict[str, normkit.BatchNorm | normkit.InstanceNorm]:
        bn, inorm = normkit.BatchNorm(3), normkit.InstanceNorm(3, track_running_stats=True)
        bn.load_state_dict(bn_state())
        inorm(np.ones((2, 3, 4), np.float32))
        return {"bn": bn, "in": inorm}

    def forward(model: dict) -> object:
        return lambda x: model["in"](model["bn"](x))

    def rank(comm: object) -> tuple:
        model = layers()
        recalibrate(
            model,
            shards[comm.rank],
            forward=forward(model),
            estimator=estimator,
            progress=False,
            communicator=comm,
        )
        return tuple(model[k].state_dict()[s] for k in ("bn", "in") for s in ("running_mean", "running_var"))

    results = ThreadGroup(3).run(rank)
    for r in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(r, results[0], strict=True))
    single = layers()
    recalibrate(single, batches, forward=forward(single), estimator=estimator, progress=False)
    expected = tuple(single[k].state_dict()[s] for k in ("bn", "in") for s in ("running_mean", "running_var"))
    probe = layers()["bn"]  # the instance norm's inputs: the batch norm's outputs in training
    magnitude = max(float(np.abs(a).max()) for b in batches for a in (b, probe(b)))
    for got, want, statistic in zip(results[0], expected, ("mean", "var") * 2, strict=True):
        np.testing.assert_allclose(
            got, want, **statistics_tolerance("float32", statistic, magnitude).pairwise().kwargs
        )
