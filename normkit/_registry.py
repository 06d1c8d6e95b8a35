"""The backend registry: the only module that touches pluggy.

Design requirements, in order of importance:

1. pluggy discovers and validates backends; per call, dispatch is one dict lookup keyed by
   ``type(x)``, resolved once per array type. A pluggy hook call costs about a microsecond, a
   dict lookup about 50 ns.
2. Nothing is imported that the caller did not hand us. A backend's entry point (group
   ``normkit.backends``, named after its framework's top-level module) is loaded only once
   that module is in :data:`sys.modules` -- an array of a framework's type cannot exist before
   the framework is imported, so resolution never imports one.
3. pluggy's ordering is honoured: among the plugins that claim an array type, each operation
   goes to the implementation pluggy would call first (``tryfirst``, then last registered).
4. Switches are read when the registry is first used, not at import time:
   ``NORMKIT_DISABLE_PLUGIN_AUTOLOAD=1`` (or ``true``, ``yes``, ``on``) loads no entry points
   (register plugins yourself with :func:`register_backend`),
   ``NORMKIT_BLOCK_BACKENDS=tensorflow,cupy`` blocks backends by name.
5. One broken backend does not take the others down: an entry point that fails to load is
   skipped with a ``RuntimeWarning`` and its error is shown by ``normkit info`` and in the
   error for its array type.
6. Some subclasses of an array type mean something their base class does not: a
   ``numpy.ma.MaskedArray`` is an ``ndarray`` whose mask every kernel would silently ignore.
   A backend that claims the base class does not thereby claim them (see
   ``UNCLAIMED_SUBCLASSES``); it must name them in its ``array_types``. The check is part
   of resolving a type, so it is paid once per type, never per call.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import pluggy

from normkit.errors import NoBackendError

if TYPE_CHECKING:
    import importlib.metadata

    from normkit.hookspecs import BackendInfo

__all__ = [
    "AUTOLOAD_ENV",
    "BLOCK_ENV",
    "ENTRY_POINT_GROUP",
    "OPS",
    "Backend",
    "backend_for",
    "backend_named",
    "hookimpl",
    "hookspec",
    "load_backend",
    "register_backend",
    "reset",
]

PROJECT = "normkit"
ENTRY_POINT_GROUP = "normkit.backends"
AUTOLOAD_ENV = "NORMKIT_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "NORMKIT_BLOCK_BACKENDS"
OPS = ("batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm", "moments", "normalize")
"""Every operation hook of the spec (composites, then the version-2 primitives)."""

hookspec = pluggy.HookspecMarker(PROJECT)
"""Marks a hook specification in :mod:`normkit.hookspecs`."""
hookimpl = pluggy.HookimplMarker(PROJECT)
"""Marks a backend's implementation of a hook: ``@normkit.hookimpl``."""

# Distributions that provide the first-party backends, for install hints.
KNOWN_DISTRIBUTIONS = {
    "torch": "normkit-torch",
    "tensorflow": "normkit-tensorflow",
    "cupy": "normkit-cupy",
    "jax": "normkit-jax",
}

# Frameworks whose arrays are defined in another top-level module than the one users import:
# a concrete JAX array is a ``jaxlib._jax.ArrayImpl``, but its backend is the one for ``jax``.
FRAMEWORK_ALIASES = {"jaxlib": "jax"}


def named_class(spec: str) -> type | None:
    """The class named ``"module:QualName"``, or ``None`` if its module is not imported (or has
    no such class). Never imports."""
    module_name, _, qualname = spec.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        if obj is None:
            return None
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


@lru_cache(maxsize=256)
def is_subclass_of_named(cls: type, spec: str) -> bool:
    """True if ``cls`` is a subclass of the class named ``"module:QualName"``.

    Never imports: if the module is not in :data:`sys.modules`, no instance of its classes
    can exist, and the answer is False.
    """
    named = named_class(spec)
    return named is not None and issubclass(cls, named)


@dataclass(frozen=True)
class UnclaimedSubclass:
    """A subclass of an array type that a backend claiming the base class does not claim.

    The texts are sentences for error messages; ``{name}`` stands for the parameter's name.
    """

    spec: str
    """The class, as ``"module:QualName"``."""
    why: str
    """Why normkit refuses it."""
    input_advice: str
    """What to pass instead as the input ``x``."""
    parameter_advice: str
    """What to pass instead as a parameter (``weight``, ``running_mean``, ``out``, ...)."""


UNCLAIMED_SUBCLASSES: tuple[UnclaimedSubclass, ...] = (
    UnclaimedSubclass(
        spec="numpy.ma:MaskedArray",
        why=(
            "normkit does not take masked arrays (pass the mask separately: mask= of moments and "
            "batch_norm, True where a value counts), and treating one as a plain array would "
            "silently ignore its mask"
        ),
        input_advice=(
            "To leave the masked values out of the statistics, pass {name}.filled(0) with "
            "mask=~np.ma.getmaskarray({name}); to ignore the mask, pass {name}.filled(value) or "
            "np.asarray({name})"
        ),
        parameter_advice=(
            "Pass np.asarray({name}) to ignore the mask, or {name}.filled(value) to replace the masked values"
        ),
    ),
)
"""Subclasses that no backend claims through a base class (principle 6 above)."""


@lru_cache(maxsize=256)
def unclaimed_subclass(cls: type) -> UnclaimedSubclass | None:
    """The entry of :data:`UNCLAIMED_SUBCLASSES` that ``cls`` is (a subclass of), or ``None``."""
    for entry in UNCLAIMED_SUBCLASSES:
        if is_subclass_of_named(cls, entry.spec):
            return entry
    return None


@lru_cache(maxsize=256)
def claimed_by(cls: type, spec: str) -> bool:
    """True if a backend whose ``array_types`` include ``spec`` handles arrays of type ``cls``.

    ``cls`` must be a subclass of the named class; and if ``cls`` is an unclaimed subclass (a
    masked array), the named class must be one too: claiming ``numpy:ndarray`` does not claim
    ``numpy.ma.MaskedArray``, claiming ``numpy.ma:MaskedArray`` does.
    """
    if not is_subclass_of_named(cls, spec):
        return False
    entry = unclaimed_subclass(cls)
    if entry is None:
        return True
    named = named_class(spec)
    return named is not None and unclaimed_subclass(named) is entry


def unsupported_array_message(cls: type, name: str, *, is_input: bool) -> str | None:
    """The error for a parameter ``name`` of an unclaimed subclass type (a masked array), or
    ``None`` for any other type: what it got, why it is refused and what to pass instead."""
    entry = unclaimed_subclass(cls)
    if entry is None:
        return None
    base = type_name(named_class(entry.spec) or cls)
    got = base if type_name(cls) == base else f"{type_name(cls)} (a {base})"
    advice = entry.input_advice if is_input else entry.parameter_advice
    return f"{name} is a {got}: {entry.why}. {advice.format(name=name)}."


def type_name(cls: type) -> str:
    """``module.QualName`` of a class, for messages (``numpy.ndarray``, ``torch.Tensor``)."""
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


@dataclass(frozen=True)
class Backend:
    """One backend as resolved for an array type: its info and one kernel per operation.

    A composite the backend does not implement is composed from its primitives
    (:mod:`normkit.composed`) when it has both; otherwise the kernel raises
    ``NotImplementedError`` naming the backend and the operation. ``composed`` names the
    operations served by composition.
    """

    name: str
    info: BackendInfo
    batch_norm: Callable[..., Any]
    instance_norm: Callable[..., Any]
    layer_norm: Callable[..., Any]
    group_norm: Callable[..., Any]
    rms_norm: Callable[..., Any]
    moments: Callable[..., Any]
    normalize: Callable[..., Any]
    composed: frozenset[str] = frozenset()
    _handled: set[type] = field(default_factory=set, repr=False, compare=False)

    def handles(self, cls: type) -> bool:
        """True if arrays of type ``cls`` belong to this backend."""
        if cls in self._handled:
            return True
        if any(claimed_by(cls, spec) for spec in self.info.array_types):
            self._handled.add(cls)
            return True
        return False


def _missing_kernel(backend: str, op: str) -> Callable[..., Any]:
    why = (
        " (a spec-2 primitive: composition from the primitives, mask=, and moments need it)"
        if op in ("moments", "normalize")
        else " (nor both primitives, moments and normalize, that normkit composes it from)"
    )

    def missing(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"backend {backend!r} does not implement {op}{why}")

    missing.__name__ = f"missing_{op}"
    return missing


class _Registry:
    """The plugin manager, the entry points and the per-type dispatch tables."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pm: pluggy.PluginManager | None = None
        self._by_type: dict[type, Backend] = {}
        self._by_name: dict[tuple[str, type], Backend] = {}
        self._entry_points: tuple[importlib.metadata.EntryPoint, ...] | None = None
        self.autoload = True
        self.blocked: frozenset[str] = frozenset()
        self.load_errors: dict[str, str] = {}

    # -- construction -----------------------------------------------------------------
    def manager(self) -> pluggy.PluginManager:
        if self._pm is None:
            with self._lock:
                if self._pm is None:
                    self._pm = self._build_manager()
        return self._pm

    def _build_manager(self) -> pluggy.PluginManager:
        from normkit import hookspecs, numpy_backend

        self.autoload = os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes", "on")
        self.blocked = frozenset(
            name.strip() for name in os.environ.get(BLOCK_ENV, "").split(",") if name.strip()
        )
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(hookspecs)
        for name in self.blocked:
            pm.set_blocked(name)
        pm.register(numpy_backend, name="numpy")
        pm.check_pending()
        return pm

    def entry_points(self) -> tuple[importlib.metadata.EntryPoint, ...]:
        """Installed backends' entry points (read from metadata; nothing is loaded)."""
        if self._entry_points is None:
            import importlib.metadata  # here, not at import: it costs ~25 ms of `import normkit`

            found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
            self._entry_points = tuple(sorted(found, key=lambda ep: ep.name))
        return self._entry_points

    def _load_imported_frameworks(self) -> None:
        """Register every installed backend whose framework is already imported."""
        pm = self.manager()  # reads the switches
        if not self.autoload:
            return
        for ep in self.entry_points():
            if ep.name not in sys.modules or pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
                continue
            if ep.name in self.load_errors:
                continue
            try:
                self._register(ep.load(), ep.name)
            except Exception as error:  # one broken backend must not take the others down
                self.load_errors[ep.name] = f"{type(error).__name__}: {error}"
                warnings.warn(
                    f"normkit backend {ep.name!r} ({ep.value}) failed to load and is skipped: "
                    f"{self.load_errors[ep.name]}",
                    RuntimeWarning,
                    stacklevel=4,
                )

    def _register(self, plugin: object, name: str) -> None:
        """Register and validate a plugin; a plugin that fails validation is removed again."""
        pm = self.manager()
        pm.register(plugin, name=name)
        try:
            pm.check_pending()
        except Exception:
            pm.unregister(plugin, name=name)
            raise
        finally:
            self._by_type.clear()
            self._by_name.clear()

    def register(self, plugin: object, name: str | None = None) -> str:
        with self._lock:
            self.manager()
            name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
            self._register(plugin, name)
            return name

    def unregister(self, name: str) -> None:
        with self._lock:
            pm = self.manager()
            plugin = pm.get_plugin(name)
            if plugin is not None:
                pm.unregister(plugin, name=name)
            self._by_type.clear()
            self._by_name.clear()

    def info(self, name: str) -> BackendInfo:
        """The info of the backend registered as ``name``, importing its framework and loading
        its entry point first if it is installed but not loaded yet.

        :raises ValueError: if no such backend is registered or installed, or it is blocked.
        """
        with self._lock:
            pm = self.manager()
            if not pm.has_plugin(name):
                installed = {ep.name for ep in self.entry_points()}
                if pm.is_blocked(name):
                    raise ValueError(f"backend {name!r} is blocked by {BLOCK_ENV}")
                if name not in installed:
                    known = sorted(set(self.loaded()) | installed)
                    raise ValueError(f"backend={name!r} is neither registered nor installed; known: {known}")
                if not self.autoload:
                    raise ValueError(f"backend {name!r} is installed but {AUTOLOAD_ENV} disables autoloading")
                importlib.import_module(name)
                self._load_imported_frameworks()
            for plugin, info in self._infos():
                if plugin == name:
                    return info
            raise ValueError(f"plugin {name!r} does not implement normkit_backend_info")

    # -- resolution -------------------------------------------------------------------
    def _infos(self) -> list[tuple[str, BackendInfo]]:
        """``(plugin name, info)`` in pluggy's call order."""
        pm = self.manager()
        result = []
        for impl in reversed(pm.hook.normkit_backend_info.get_hookimpls()):
            result.append((impl.plugin_name, impl.function()))
        return result

    def _kernel(self, op: str, plugins: set[str]) -> Callable[..., Any] | None:
        from normkit import hookspecs

        caller = getattr(self.manager().hook, f"normkit_{op}")
        for impl in reversed(caller.get_hookimpls()):
            if impl.plugin_name in plugins and not (impl.hookwrapper or impl.wrapper):
                _check_signature(impl.function, getattr(hookspecs, f"normkit_{op}"), impl.plugin_name)
                return impl.function
        return None

    def _build(self, claims: list[tuple[str, BackendInfo]]) -> Backend:
        from normkit import composed

        plugins = {plugin for plugin, _ in claims}
        info = claims[0][1]
        found = {op: self._kernel(op, plugins) for op in OPS}
        kernels: dict[str, Callable[..., Any]] = {}
        made: set[str] = set()
        for op in OPS:
            kernel = found[op]
            if kernel is None and found["moments"] is not None and found["normalize"] is not None:
                kernel = composed.composite(op, info, found["moments"], found["normalize"])
                made.add(op)
            kernels[op] = kernel if kernel is not None else _missing_kernel(info.name, op)
        return Backend(name=info.name, info=info, composed=frozenset(made), **kernels)

    def for_type(self, cls: type) -> Backend:
        try:
            return self._by_type[cls]
        except KeyError:
            pass
        with self._lock:
            self._load_imported_frameworks()
            claims = [
                (plugin, info)
                for plugin, info in self._infos()
                if any(claimed_by(cls, spec) for spec in info.array_types)
            ]
            if not claims:
                raise NoBackendError(self._no_backend_message(cls))
            backend = self._build(claims)
            return self._by_type.setdefault(cls, backend)

    def named(self, name: str, cls: type) -> Backend:
        try:
            return self._by_name[name, cls]
        except KeyError:
            pass
        with self._lock:
            self._load_imported_frameworks()
            pm = self.manager()
            if not pm.has_plugin(name):
                known = sorted({plugin for plugin, _ in self._infos()})
                installed = [ep.name for ep in self.entry_points()]
                raise ValueError(
                    f"backend={name!r} is not a loaded normkit backend; loaded: {known}"
                    + (f", installed: {installed}" if installed else "")
                    + (f" (blocked by {BLOCK_ENV})" if pm.is_blocked(name) else "")
                )
            claims = [(plugin, info) for plugin, info in self._infos() if plugin == name]
            if not claims:
                raise NoBackendError(f"plugin {name!r} does not implement normkit_backend_info")
            info = claims[0][1]
            if not any(claimed_by(cls, spec) for spec in info.array_types):
                raise TypeError(
                    unsupported_array_message(cls, "x", is_input=True)
                    or f"backend={name!r} handles {list(info.array_types)}, not {type_name(cls)}"
                )
            backend = self._build(claims)
            return self._by_name.setdefault((name, cls), backend)

    def _no_backend_message(self, cls: type) -> str:
        framework = cls.__module__.split(".")[0]
        framework = FRAMEWORK_ALIASES.get(framework, framework)
        what = f"no normkit backend handles arrays of type {type_name(cls)}"
        entry = unclaimed_subclass(cls)
        if entry is not None:
            advice = entry.parameter_advice.format(name="array")
            return f"{what}: {entry.why}. {advice}."
        if framework == "builtins":
            return f"{what}: pass an array (a numpy.ndarray, or a framework's tensor with its normkit backend installed)"
        if self.manager().is_blocked(framework):
            dists = [
                ep.dist.name for ep in self.entry_points() if ep.name == framework and ep.dist is not None
            ]
            provider = f" ({dists[0]})" if dists else ""
            return f"{what}: backend {framework!r}{provider} is blocked by {BLOCK_ENV}"
        if framework in self.load_errors:
            return f"{what}: backend {framework!r} is installed but failed to load: {self.load_errors[framework]}"
        for plugin, info in self._infos():
            if plugin == framework:
                return f"{what}: backend {plugin!r} handles {list(info.array_types)} only"
        installed = {ep.name: ep for ep in self.entry_points()}
        if framework in installed:
            ep = installed[framework]
            dist = ep.dist.name if ep.dist is not None else KNOWN_DISTRIBUTIONS.get(framework, "?")
            if not self.autoload:
                return (
                    f"{what}: backend {framework!r} ({dist}) is installed but {AUTOLOAD_ENV} "
                    f"disables autoloading; register it with normkit.register_backend()"
                )
        dist = KNOWN_DISTRIBUTIONS.get(framework, f"normkit-{framework}")
        hint = f"pip install {dist}"
        if framework in KNOWN_DISTRIBUTIONS:
            hint += f"  (or: pip install 'normkit[{framework}]')"
        return f"{what}; install the backend for {framework}: {hint}"

    # -- introspection ----------------------------------------------------------------
    def loaded(self) -> list[str]:
        return sorted(name for name, plugin in self.manager().list_name_plugin() if plugin is not None)

    def reset(self) -> None:
        with self._lock:
            self._pm = None
            self._by_type.clear()
            self._by_name.clear()
            self._entry_points = None
            self.load_errors = {}
            is_subclass_of_named.cache_clear()
            unclaimed_subclass.cache_clear()
            claimed_by.cache_clear()


def _check_signature(function: Callable[..., Any], spec: Callable[..., Any], plugin: str) -> None:
    """normkit calls implementations directly, so their parameters must equal the spec's (plus,
    optionally, the keyword-only ``out``; see :func:`takes_out`)."""
    expected = list(inspect.signature(spec).parameters)
    got = [
        name for name in inspect.signature(function).parameters if not (name == "out" and takes_out(function))
    ]
    if got != expected:
        raise TypeError(
            f"plugin {plugin!r}: {function.__qualname__}({', '.join(got)}) must take exactly the "
            f"spec's parameters, in order: ({', '.join(expected)}), and optionally a keyword-only out=None"
        )


@lru_cache(maxsize=64)
def takes_out(function: Callable[..., Any]) -> bool:
    """True if a kernel declares the optional keyword-only ``out`` parameter (it then writes ``y``
    into a given array)."""
    parameter = inspect.signature(function).parameters.get("out")
    return parameter is not None and parameter.kind is inspect.Parameter.KEYWORD_ONLY


_REGISTRY = _Registry()


def backend_for(x: Any) -> Backend:
    """The backend for ``x``'s array type (one dict lookup after the first call)."""
    try:
        return _REGISTRY._by_type[type(x)]
    except KeyError:
        return _REGISTRY.for_type(type(x))


def backend_named(name: str, x: Any) -> Backend:
    """The backend registered as ``name``, which must handle ``x``'s array type."""
    return _REGISTRY.named(name, type(x))


def register_backend(plugin: object, name: str | None = None) -> str:
    """Register a backend plugin (a module or object with ``@normkit.hookimpl`` functions).

    Entry-point backends register themselves; use this when autoloading is disabled or for a
    plugin that is not installed as a distribution. Returns the name it was registered under.
    """
    return _REGISTRY.register(plugin, name)


def unregister_backend(name: str) -> None:
    """Remove a registered backend by name (the dispatch tables are rebuilt on next use)."""
    _REGISTRY.unregister(name)


def load_backend(name: str) -> BackendInfo:
    """The :class:`~normkit.hookspecs.BackendInfo` of the backend named ``name``, importing its
    framework first if the backend is installed but not yet loaded (used by the conformance
    suite and ``normkit check``)."""
    return _REGISTRY.info(name)


def reset() -> None:
    """Forget every plugin and cached table; the next call rebuilds them (re-reading the
    environment switches)."""
    _REGISTRY.reset()


def registry() -> _Registry:
    """The process-wide registry (for the CLI and tests)."""
    return _REGISTRY
