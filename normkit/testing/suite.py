"""``ConformanceTests``: the suite a backend subclasses to check itself against the spec.

.. code-block:: python

    # conftest.py
    pytest_plugins = ["normkit.testing.plugin"]

    # test_conformance.py
    from normkit.testing import ConformanceTests

    class TestMyBackend(ConformanceTests):
        backend = "mybackend"

Each case of :data:`normkit.testing.cases.CASES` becomes ``test_case[<id>]``; hypothesis adds
random cases and the test-time properties (in eval a sample's output does not depend on the
rest of its batch; in training it does). Unsupported dtypes and devices skip by themselves,
from the backend's :class:`~normkit.hookspecs.BackendInfo`.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import normkit
from normkit import hookspecs
from normkit._registry import OPS, backend_named, load_backend, takes_out
from normkit.numpy_backend import numpy_dtype
from normkit.testing import strategies
from normkit.testing.cases import CASES, Case
from normkit.testing.runner import run_case
from normkit.testing.tolerances import EPS, compute_dtype, output_tolerance, reduction_growth

__all__ = ["ConformanceTests"]


def _settings(config: pytest.Config) -> settings:
    return settings(
        max_examples=config.getoption("normkit_max_examples", 25),
        derandomize=config.getoption("normkit_derandomize", False),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )


class ConformanceTests:
    """Subclass and set ``backend`` to the backend's registered name."""

    backend: ClassVar[str]

    def _device(self, config: pytest.Config) -> str | None:
        return config.getoption("normkit_device", None)

    def _asarray(self, array: np.ndarray, dtype: str, config: pytest.Config) -> Any:
        return load_backend(self.backend).asarray(array, dtype, self._device(config))

    def _require(self, config: pytest.Config, *ops: str) -> None:
        """Skip unless the backend serves ``ops`` (a spec-1 backend lacks the spec-2 ones)."""
        info = load_backend(self.backend)
        backend = backend_named(self.backend, self._asarray(np.zeros(2), info.dtypes[-1], config))
        for op in ops:
            if getattr(backend, op).__name__ == f"missing_{op}":
                pytest.skip(f"backend {self.backend!r} does not implement {op}")

    @pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
    def test_case(self, case: Case, pytestconfig: pytest.Config) -> None:
        result = run_case(case, self.backend, self._device(pytestconfig), raise_errors=True)
        if result.skipped:
            pytest.skip(result.skipped)
        assert result.passed, result.report()

    def test_kernel_signatures_match_the_spec(self, pytestconfig: pytest.Config) -> None:
        info = load_backend(self.backend)
        sample = self._asarray(np.zeros(2), info.dtypes[-1], pytestconfig)
        backend = backend_named(self.backend, sample)
        for op in OPS:
            spec = list(inspect.signature(getattr(hookspecs, f"normkit_{op}")).parameters)
            kernel = getattr(backend, op)
            if kernel.__name__ == f"missing_{op}":
                continue
            parameters = [name for name in inspect.signature(kernel).parameters if name != "out"]
            assert parameters == spec, f"{op}: parameters differ from the spec"

    @pytest.mark.parametrize(
        ("op", "training"),
        [("batch_norm", True), ("batch_norm", False), ("instance_norm", True), ("instance_norm", False),
         ("layer_norm", True), ("group_norm", True), ("rms_norm", True)],
    )  # fmt: skip
    @pytest.mark.parametrize("in_place", [False, True], ids=["out", "out-is-x"])
    def test_out_receives_exactly_y(
        self, op: str, training: bool, in_place: bool, pytestconfig: pytest.Config
    ) -> None:
        """``out=`` returns ``out`` holding exactly the ``y`` of the same call without it (and the
        same running statistics), also when ``out`` is ``x``; a backend whose kernel takes no
        ``out`` refuses it with a TypeError."""
        info = load_backend(self.backend)
        dtype = "float32" if "float32" in info.dtypes else info.dtypes[-1]
        rng = np.random.default_rng(7)
        x_np = rng.normal(3.0, 2.0, size=(4, 3, 5, 6))

        def call(**extra: Any) -> tuple[Any, ...]:
            x = extra.pop("x") if "x" in extra else self._asarray(x_np, dtype, pytestconfig)
            if op == "layer_norm":
                return (normkit.layer_norm(x, (5, 6), backend=self.backend, **extra),)
            if op == "group_norm":
                return (normkit.group_norm(x, 3, backend=self.backend, **extra),)
            if op == "rms_norm":
                return (normkit.rms_norm(x, normalized_shape=(5, 6), backend=self.backend, **extra),)
            stats = [self._asarray(np.full(3, v), "float32", pytestconfig) for v in (0.5, 2.0)]
            function = normkit.batch_norm if op == "batch_norm" else normkit.instance_norm
            flag = {"training": training} if op == "batch_norm" else {"use_input_stats": training}
            return tuple(function(x, *stats, backend=self.backend, **flag, **extra))

        self._require(pytestconfig, op)
        sample = self._asarray(x_np, dtype, pytestconfig)
        kernel = getattr(backend_named(self.backend, sample), op)
        if not takes_out(kernel):
            with pytest.raises(TypeError, match="out="):
                call(out=sample)
            return
        expected = [info.to_numpy(a) for a in call()]
        x = self._asarray(x_np, dtype, pytestconfig)
        out = x if in_place else self._asarray(np.full(x_np.shape, np.nan), dtype, pytestconfig)
        got = call(x=x, out=out)
        assert got[0] is out
        for e, g in zip(expected, got, strict=True):
            np.testing.assert_array_equal(info.to_numpy(g), e)

    def test_random_cases_agree_with_the_reference(self, pytestconfig: pytest.Config) -> None:
        info = load_backend(self.backend)
        device = self._device(pytestconfig)

        @_settings(pytestconfig)
        @given(case=strategies.cases(tuple(d for d in info.dtypes if d != "bfloat16") or info.dtypes))
        def check(case: Case) -> None:
            result = run_case(case, self.backend, device, raise_errors=True)
            assume(result.skipped is None)
            assert result.passed, result.report()

        check()

    def _trained_layer(self, layer: Any, x: np.ndarray, dtype: str, config: pytest.Config) -> Any:
        rng = np.random.default_rng(0)
        for _ in range(3):
            layer(self._asarray(rng.normal(2.0, 3.0, size=x.shape), dtype, config))
        return layer

    def test_eval_output_of_a_sample_does_not_depend_on_its_batch(self, pytestconfig: pytest.Config) -> None:
        info = load_backend(self.backend)

        @_settings(pytestconfig)
        @given(
            op=st.sampled_from(["batch_norm", "instance_norm"]),
            dtype=st.sampled_from([d for d in ("float32", "float64") if d in info.dtypes]),
            batch=st.integers(2, 6),
            channels=st.integers(1, 4),
            spatial=st.lists(st.integers(2, 4), min_size=1, max_size=2),
            seed=st.integers(0, 2**16),
        )
        def check(op: str, dtype: str, batch: int, channels: int, spatial: list[int], seed: int) -> None:
            shape = (batch, channels, *spatial)
            layer_class = normkit.BatchNorm if op == "batch_norm" else normkit.InstanceNorm
            layer = layer_class(track_running_stats=True, backend=self.backend)
            layer = self._trained_layer(layer, np.empty(shape), dtype, pytestconfig).eval()
            rng = np.random.default_rng(seed)
            x = rng.normal(2.0, 3.0, size=shape).astype(numpy_dtype(dtype))
            other = x.copy()
            other[1:] = rng.normal(-5.0, 0.5, size=other[1:].shape)
            whole = info.to_numpy(layer(self._asarray(x, dtype, pytestconfig))).astype(np.float64)
            changed = info.to_numpy(layer(self._asarray(other, dtype, pytestconfig))).astype(np.float64)
            alone = info.to_numpy(layer(self._asarray(x[:1], dtype, pytestconfig))).astype(np.float64)
            bound = output_tolerance(dtype).bound(whole[:1], 0.0)
            assert np.all(np.abs(changed[:1] - whole[:1]) <= bound), (
                "eval output of sample 0 changed with the rest of the batch"
            )
            assert np.all(np.abs(alone - whole[:1]) <= bound), (
                "eval output of sample 0 differs when it is alone"
            )

        check()

    def test_training_output_of_a_sample_depends_on_its_batch(self, pytestconfig: pytest.Config) -> None:
        info = load_backend(self.backend)

        @_settings(pytestconfig)
        @given(
            dtype=st.sampled_from([d for d in ("float32", "float64") if d in info.dtypes]),
            batch=st.integers(3, 6),  # with two values, any two distinct values normalize to -1, +1
            channels=st.integers(1, 4),
            spatial=st.lists(st.integers(1, 4), max_size=2),
            seed=st.integers(0, 2**16),
        )
        def check(dtype: str, batch: int, channels: int, spatial: list[int], seed: int) -> None:
            shape = (batch, channels, *spatial)
            rng = np.random.default_rng(seed)
            x = rng.normal(0.0, 1.0, size=shape).astype(numpy_dtype(dtype))

            # The rest of the batch far above sample 0, then far below it: its normalized value
            # is clearly negative in one batch and positive in the other, so a correct backend's
            # y[0] cannot equal both (one shifted batch alone can coincide with the original).
            def first_sample(rest_loc: float) -> np.ndarray:
                batch_x = x.copy()
                batch_x[1:] = rng.normal(rest_loc, 0.5, size=batch_x[1:].shape)
                layer = normkit.BatchNorm(backend=self.backend)
                return info.to_numpy(layer(self._asarray(batch_x, dtype, pytestconfig)))[:1].astype(
                    np.float64
                )

            y = info.to_numpy(normkit.BatchNorm(backend=self.backend)(self._asarray(x, dtype, pytestconfig)))
            difference = max(float(np.abs(y[:1] - first_sample(loc)).max()) for loc in (10.0, -10.0))
            assert difference > 1e3 * output_tolerance(dtype).atol, (
                "training output of sample 0 ignored the rest of its batch"
            )

        check()

    def test_instance_norm_in_training_treats_each_sample_alone(self, pytestconfig: pytest.Config) -> None:
        info = load_backend(self.backend)

        @_settings(pytestconfig)
        @given(
            dtype=st.sampled_from([d for d in ("float32", "float64") if d in info.dtypes]),
            batch=st.integers(2, 6),
            channels=st.integers(1, 4),
            spatial=st.lists(st.integers(2, 5), min_size=1, max_size=2),
            seed=st.integers(0, 2**16),
        )
        def check(dtype: str, batch: int, channels: int, spatial: list[int], seed: int) -> None:
            rng = np.random.default_rng(seed)
            x = rng.normal(1.0, 2.0, size=(batch, channels, *spatial)).astype(numpy_dtype(dtype))
            layer = normkit.InstanceNorm(backend=self.backend)
            whole = info.to_numpy(layer(self._asarray(x, dtype, pytestconfig))).astype(np.float64)
            alone = info.to_numpy(layer(self._asarray(x[-1:], dtype, pytestconfig))).astype(np.float64)
            assert np.all(np.abs(alone - whole[-1:]) <= output_tolerance(dtype).bound(whole[-1:], 0.0))

        check()

    def test_merge_of_random_splits_equals_the_whole(self, pytestconfig: pytest.Config) -> None:
        """For random splits of a batch into 1-8 parts of unequal sizes (some empty, some of one
        value), ``merge_moments`` of the parts' moments equals the moments of the whole, at
        |mean|/std = 1e4 in float32, within the bounds of
        :func:`normkit.testing.primitives.moments_bounds` carried through the merge."""
        from normkit.testing.primitives import _merge_bounds

        self._require(pytestconfig, "moments")
        info = load_backend(self.backend)
        dtype = "float32" if "float32" in info.dtypes else info.dtypes[-1]

        @_settings(pytestconfig)
        @given(
            cuts=st.lists(st.integers(0, 48), min_size=0, max_size=7),
            seed=st.integers(0, 2**16),
        )
        def check(cuts: list[int], seed: int) -> None:
            edges = [0, *sorted(cuts), 48]
            sizes = tuple(b - a for a, b in itertools.pairwise(edges))
            x_np = np.random.default_rng(seed).normal(1e4, 1.0, size=(48, 3)).astype(numpy_dtype(dtype))
            x = self._asarray(x_np, dtype, pytestconfig)
            parts, start = [], 0
            for size in sizes:
                parts.append(normkit.moments(x[start : start + size], axis=1, backend=self.backend))
                start += size
            merged = normkit.merge_moments(*parts)
            count, mean, m2, e_mean, e_m2 = _merge_bounds(x_np.astype(np.float64), sizes, 1, dtype)
            np.testing.assert_array_equal(info.to_numpy(merged.count), count)
            for name, got, ref, bound in (("mean", merged.mean, mean, e_mean), ("m2", merged.m2, m2, e_m2)):
                error = np.abs(np.asarray(info.to_numpy(got), np.float64) - ref)
                assert np.all(error <= bound), (
                    f"merged {name} of parts {sizes}: error {error} > bound {bound}"
                )

        check()

    @pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
    def test_rms_cast_order_is_the_named_one(self, dtype: str, pytestconfig: pytest.Config) -> None:
        r"""Each cast order reproduces its own rounding exactly, except where the compute dtype's
        normalized value lies within its own error of a rounding boundary of the input dtype:
        a share of at most :math:`2\,(r(n) + 4)\,\epsilon_c/\epsilon` of the elements (the
        relative error of the float32 value over the spacing of the input dtype). The two
        orders differ on about a quarter of float16 elements (one ulp), so the test tells them
        apart."""
        self._require(pytestconfig, "rms_norm")
        info = load_backend(self.backend)
        if dtype not in info.dtypes:
            pytest.skip(f"backend {self.backend!r} does not support {dtype}")
        n = 256
        rng = np.random.default_rng(11)
        x_np = rng.normal(0.0, 3.0, size=(32, n)).astype(numpy_dtype(dtype))
        w_np = rng.uniform(0.0, 2.0, size=n).astype(numpy_dtype(dtype))
        x, w = self._asarray(x_np, dtype, pytestconfig), self._asarray(w_np, dtype, pytestconfig)
        x64, w64 = x_np.astype(np.float64), w_np.astype(np.float64)
        unit = x64 / np.sqrt(np.mean(x64**2, axis=1, keepdims=True) + EPS["float32"])
        expected = {
            "after_weight": (unit * w64).astype(numpy_dtype(dtype)),
            "before_weight": (unit.astype(numpy_dtype(dtype)).astype(np.float64) * w64).astype(
                numpy_dtype(dtype)
            ),
        }
        differing = np.mean(expected["after_weight"] != expected["before_weight"])
        allowed = 2 * (reduction_growth(n) + 4) * EPS[compute_dtype(dtype)] / EPS[dtype]
        assert differing > 4 * allowed, "the data do not tell the two cast orders apart"
        for cast, exact in expected.items():
            y = normkit.rms_norm(x, w, normalized_shape=n, cast=cast, backend=self.backend)
            mismatched = np.mean(np.asarray(info.to_numpy(y)) != exact)
            assert mismatched <= allowed, (
                f"cast={cast!r}: {mismatched:.2%} of {dtype} outputs differ from that order's rounding "
                f"(allowed {allowed:.2%}; the orders differ on {differing:.2%})"
            )

    @pytest.mark.parametrize("layout", ["channels-first", "channels-last"])
    def test_group_norm_extremes_are_layer_and_instance_norm(
        self, layout: str, pytestconfig: pytest.Config
    ) -> None:
        """One group is layer norm over every axis but the batch axis; C groups are instance
        norm (both without affine), on this backend's own kernels."""
        self._require(pytestconfig, "group_norm")
        info = load_backend(self.backend)
        dtype = "float32" if "float32" in info.dtypes else info.dtypes[-1]
        axis = 1 if layout == "channels-first" else -1
        shape = (3, 4, 5, 6) if axis == 1 else (3, 5, 6, 4)
        x_np = np.random.default_rng(5).normal(2.0, 3.0, size=shape).astype(numpy_dtype(dtype))
        x = self._asarray(x_np, dtype, pytestconfig)
        one = info.to_numpy(normkit.group_norm(x, 1, axis=axis, backend=self.backend)).astype(np.float64)
        layer = info.to_numpy(normkit.layer_norm(x, shape[1:], backend=self.backend)).astype(np.float64)
        bound = output_tolerance(dtype).pairwise().bound(layer, 0.0)  # both outputs have |y| ~ |layer|
        assert np.all(np.abs(one - layer) <= bound), "group_norm with one group differs from layer_norm"
        every = info.to_numpy(normkit.group_norm(x, 4, axis=axis, backend=self.backend)).astype(np.float64)
        instance = info.to_numpy(normkit.instance_norm(x, axis=axis, backend=self.backend).y).astype(
            np.float64
        )
        assert np.all(np.abs(every - instance) <= bound), (
            "group_norm with C groups differs from instance_norm"
        )

    @pytest.mark.parametrize(
        ("op", "variant"),
        [("batch_norm", "train"), ("batch_norm", "eval"), ("instance_norm", "train"), ("layer_norm", "train"),
         ("group_norm", "train"), ("rms_norm", "plain"), ("rms_norm", "gemma"), ("rms_norm", "llama-float16")],
    )  # fmt: skip
    def test_composites_agree_with_their_composition_from_primitives(
        self, op: str, variant: str, pytestconfig: pytest.Config
    ) -> None:
        """Each composite kernel agrees with the same op composed from this backend's own
        primitives (:mod:`normkit.composed`): output within twice the suite's bound (two
        implementations) with the centering term of the statistics each op uses (per channel,
        instance, sample or group), updated running statistics within twice the statistics
        bound. For RMS norm with the cast before the weight in float16, one more unit in the last
        place of the input dtype times the weight: either side's normalized value may round to
        the neighbour of the other's."""
        from normkit import composed
        from normkit.testing.tolerances import centering_gain, statistics_tolerance

        self._require(pytestconfig, op, "moments", "normalize")
        info = load_backend(self.backend)
        dtype = "float16" if variant.endswith("float16") else "float32"
        if dtype not in info.dtypes:
            pytest.skip(f"backend {self.backend!r} does not support {dtype}")
        x_np = np.random.default_rng(3).normal(5.0, 2.0, size=(4, 6, 5, 3)).astype(numpy_dtype(dtype))
        x = self._asarray(x_np, dtype, pytestconfig)
        backend = backend_named(self.backend, x)
        made = composed.composite(op, info, backend.moments, backend.normalize)
        weight = self._asarray(np.linspace(0.5, 1.5, 6), "float32", pytestconfig)
        bias = self._asarray(np.linspace(-1.0, 1.0, 6), "float32", pytestconfig)
        rms_weight = self._asarray(np.linspace(0.5, 1.5, 15).reshape(5, 3), dtype, pytestconfig)
        stats = [self._asarray(np.full(6, v), "float32", pytestconfig) for v in (5.0, 4.0)]
        arguments: dict[tuple[str, str], tuple[Any, ...]] = {
            ("batch_norm", "train"): (x, weight, bias, *stats, True, 0.1, 1e-5, 1, True),
            ("batch_norm", "eval"): (x, weight, bias, *stats, False, 0.0, 1e-5, 1, True),
            ("instance_norm", "train"): (x, weight, bias, *stats, True, 0.1, 1e-5, 1, False),
            ("layer_norm", "train"): (x, None, None, (1, 2, 3), 1e-5),
            ("group_norm", "train"): (x, 3, weight, bias, 1e-5, 1),
            ("rms_norm", "plain"): (x, None, (2, 3), 1e-5, 0.0, False),
            ("rms_norm", "gemma"): (x, rms_weight, (2, 3), 1e-6, 1.0, False),
            ("rms_norm", "llama-float16"): (x, rms_weight, (2, 3), 1e-6, 0.0, True),
        }
        own, theirs = getattr(backend, op)(*arguments[op, variant]), made(*arguments[op, variant])
        own = own if isinstance(own, tuple) else (own,)
        theirs = theirs if isinstance(theirs, tuple) else (theirs,)
        x64 = x_np.astype(np.float64)
        statistics_axes = {"batch_norm": (0, 2, 3), "instance_norm": (2, 3), "layer_norm": (1, 2, 3)}
        if op == "rms_norm":
            gain = 0.0
        elif variant == "eval":
            gain = centering_gain(np.full(6, 5.0), np.full(6, 4.0), 1e-5, 1.5)
        elif op == "group_norm":
            blocks = x64.reshape(4, 3, -1)
            gain = centering_gain(blocks.mean(axis=2), blocks.var(axis=2), 1e-5, 1.5)
        else:
            axes = statistics_axes[op]
            gain = centering_gain(x64.mean(axis=axes), x64.var(axis=axes), 1e-5, 1.5)
        y_own, y_made = (np.asarray(info.to_numpy(a), np.float64) for a in (own[0], theirs[0]))
        bound = output_tolerance(dtype, centering_gain=gain).pairwise().bound(y_own, 0.0)
        if variant == "llama-float16":
            bound = bound + EPS[dtype] * np.abs(y_own)
        assert np.all(np.abs(y_own - y_made) <= bound), f"{op} ({variant}): composite and composition differ"
        for index, statistic in ((1, "mean"), (2, "var")):
            if len(own) > index and own[index] is not None:
                got, made_value = (np.asarray(info.to_numpy(a[index]), np.float64) for a in (own, theirs))
                tolerance = statistics_tolerance(dtype, statistic, float(np.abs(x64).max())).pairwise()
                np.testing.assert_allclose(made_value, got, **tolerance.kwargs)
