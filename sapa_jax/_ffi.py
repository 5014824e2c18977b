"""FFI glue: loads the compiled kernel modules, registers their handlers with XLA, and wraps
the fused forward/backward in `jax.ffi.ffi_call`, made differentiable by `_autodiff`.

Each of the two calls is batch-partitioned (`_partitioning.batch_partitioned`): under `jit` with
a batch-sharded mesh every device runs the kernel on its own shard, and `vmap` folds into the
batch. The calls are plain per-shard functions, so `shard_map` users can call `sapa_upsample`
inside their mapped function directly.

Knows nothing of Flax. Targets are registered once, at import of `sapa_jax`.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _autodiff, reference
from ._partitioning import batch_partitioned

# platform as JAX names it -> (extension module, XLA platform name for registration)
_MODULES = {"cpu": ("_sapa_cpu", "cpu"), "gpu": ("_sapa_cuda", "CUDA")}
class FfiStatus(NamedTuple):
    """Where the fused kernel of one platform stands (`sapa_jax.ffi_status()`)."""
    built: bool   # its extension module imported and its targets are registered with XLA
    usable: bool  # ... and it can run here (GPU: a new enough driver and a device JAX sees)
    reason: str   # why it is not usable, with the fix; "" when usable


PLATFORMS = tuple(_MODULES)           # the platforms a fused kernel exists for
_modules: dict[str, object] = {}      # platform -> the imported extension module
_build_errors: dict[str, str] = {}    # platform -> why its module did not import
_usability: dict[str, str] = {}       # platform -> "" (usable) or why not; probed once, lazily
# platform -> the compiled module's contract(): attribute codes of the normalisers and border
# modes and the supported dtypes (xla_ffi/sapa_contract.h), the one source of both.
_contracts: dict[str, dict] = {}


def _register(platform: str) -> None:
    module_name, xla_platform = _MODULES[platform]
    try:
        module = importlib.import_module(f"sapa_jax.{module_name}")
    except ImportError as err:
        _modules.pop(platform, None)
        _build_errors[platform] = f"extension sapa_jax.{module_name} not importable: {err}"
        return
    for name, capsule in module.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform=xla_platform)
    _contracts[platform] = module.contract()
    _modules[platform] = module
    _build_errors.pop(platform, None)


for _platform in _MODULES:
    _register(_platform)


def targets_built(platform: str, targets) -> bool:
    """Did the kernel module of `platform` register every one of `targets`?"""
    module = _modules.get(platform)
    return module is not None and all(t in module.registrations() for t in targets)


def registered_targets() -> list[str]:
    """Names of the FFI targets that the loaded kernel modules registered with XLA."""
    return sorted({name for module in _modules.values() for name in module.registrations()})


def source_tree_hint(package_dir: Path | None = None) -> str:
    """How to get the compiled kernels, naming the usual cause of their absence.

    After a plain `pip install .`, Python run from the clone's root imports the clone's
    `sapa_jax/` (the current directory comes first on sys.path), which has no compiled module.
    """
    package_dir = Path(__file__).resolve().parent if package_dir is None else Path(package_dir)
    root = package_dir.parent
    if (root / "pyproject.toml").is_file() and (root / "xla_ffi").is_dir():
        installed = _installed_package_dir()
        shadowed = (f"it shadows the sapa-jax installed in {installed}"
                    if installed is not None and installed != package_dir
                    else "Python looks in the current directory first")
        return (f"sapa_jax was imported from the source tree {package_dir}, which has no "
                f"compiled kernels ({shadowed}); run from another directory, or install the "
                f"clone in editable mode: pip install --no-build-isolation -e {root}")
    return "reinstall sapa-jax to build its kernels: pip install --no-build-isolation sapa-jax"


def _installed_package_dir() -> Path | None:
    """Where the installed distribution keeps its compiled CPU module, if anywhere."""
    try:
        files = importlib.metadata.distribution("sapa-jax").files or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.startswith("_sapa_cpu"):
            return Path(file.locate()).resolve().parent
    return None


def _cuda_version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"


def cuda_unusable_reason(probe: Mapping, jax_gpu_count: int) -> str:
    """"" when the CUDA module can run, else why not (from its `cuda_probe()` and JAX's view)."""
    driver, runtime = int(probe["driver_version"]), int(probe["runtime_version"])
    if driver == 0:
        return "no CUDA driver found (libcuda could not be loaded)"
    if driver // 1000 < runtime // 1000 or "insufficient" in str(probe["error"]).lower():
        return (f"the CUDA module was built with CUDA {_cuda_version(runtime)}, but the driver "
                f"supports CUDA up to {_cuda_version(driver)}; update the driver, or rebuild "
                f"sapa-jax with a CUDA toolkit the driver supports")
    if probe["error"]:
        return f"the CUDA runtime reports: {probe['error']}"
    if int(probe["device_count"]) == 0:
        return "no CUDA device visible"
    if jax_gpu_count == 0:
        return "JAX sees no GPU (install JAX's CUDA plugin, e.g. pip install 'jax[cuda13]')"
    return ""


def _probe_cuda() -> dict:
    return _modules["gpu"].cuda_probe()


def _jax_gpu_count() -> int:
    try:
        return len(jax.devices("gpu"))
    except RuntimeError:  # no GPU backend
        return 0


def _unusable_reason(platform: str) -> str:
    if platform in _build_errors:
        hint = (source_tree_hint() if platform == "cpu" else
                "it is built at install time when nvcc is found (SAPA_CUDA=ON requires it)")
        return f"{_build_errors[platform]}; {hint}"
    if platform not in _modules:
        return f"no fused kernel for platform {platform!r}"
    if platform == "cpu":
        return ""
    if platform not in _usability:
        try:
            _usability[platform] = cuda_unusable_reason(_probe_cuda(), _jax_gpu_count())
        except Exception as err:  # an old module without the probe, or a failing runtime
            _usability[platform] = f"the CUDA probe failed: {err}"
    return _usability[platform]


def status(platform: str) -> FfiStatus:
    reason = _unusable_reason(platform)
    return FfiStatus(built=platform in _modules, usable=not reason, reason=reason)


def available(platform: str) -> bool:
    """Is the kernel for `platform` built and able to run here?"""
    return status(platform).usable


def unavailable_reason(platform: str) -> str:
    return status(platform).reason


def supported_dtypes(platform: str):
    contract = _contracts.get(platform)
    return tuple(contract["dtypes"]) if contract else ()


def supports_dtype(platform: str, dtype) -> bool:
    return np.dtype(dtype).name in supported_dtypes(platform)


def attribute_code(kind: str, name: str) -> int:
    """The kernels' code of a normaliser (kind "normalizers") or border mode ("borders"), from
    the compiled modules' contract (both modules share sapa_common.h's codes)."""
    for contract in _contracts.values():
        return int(contract[kind][name])
    raise RuntimeError("no SAPA FFI module is registered")


def attribute_name(kind: str, code: int) -> str:
    """The inverse of `attribute_code`."""
    for contract in _contracts.values():
        return next(name for name, c in contract[kind].items() if int(c) == code)
    raise RuntimeError("no SAPA FFI module is registered")


class Options(NamedTuple):
    """Static options of one kernel call (hashable: a `nondiff_argnums` of the custom_vjp)."""
    kernel_size: int
    scale: int
    normalizer: int
    border: int
    eps: float

    def attributes(self):
        # XLA matches attribute types exactly: int64 and float64, as the handlers bind them.
        return dict(kernel_size=np.int64(self.kernel_size), scale=np.int64(self.scale),
                    normalizer=np.int64(self.normalizer), border=np.int64(self.border),
                    eps=np.float64(self.eps))


def _acc_dtype(dtype):
    """Accumulation type of the kernels: float64 for float64 inputs, else float32."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _result(shape, dtype, like):
    """Result type of a kernel call, derived from the type of the input `like`.

    Types carry more than shape and dtype: under explicit mesh axes the sharding (the result
    takes the batch sharding of the input; the kernels never mix batch elements), and inside
    `shard_map` the manual axes a value varies over. Deriving the result from the input's own
    aval keeps both, whatever the JAX version calls them.
    """
    aval = jax.typeof(like)
    mesh, spec = aval.sharding.mesh, aval.sharding.spec
    batch = spec[0] if len(spec) else None
    sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(batch, *([None] * (len(shape) - 1))))
    return aval.update(shape=tuple(shape), dtype=jnp.dtype(dtype), sharding=sharding,
                       weak_type=False)


def forward_call(q, k, v, opts: Options):
    """One "sapa_forward" call: (out, stats).

    No `vmap_method`: vmap never reaches the call, `batch_partitioned` folds a mapped axis
    into the batch first (a direct vmap of this function fails instead of guessing)."""
    points = q.shape[:-1]
    results = (_result(points + (v.shape[-1],), q.dtype, q),
               _result(points + (2,), _acc_dtype(q.dtype), q))
    call = jax.ffi.ffi_call("sapa_forward", results)
    return call(q, k, v, **opts.attributes())


def backward_call(q, k, v, stats, g, opts: Options):
    """One "sapa_backward" call: (dq, dk, dv); the two per-tap scratch outputs are dropped."""
    points = q.shape[:-1]
    taps = opts.kernel_size * opts.kernel_size
    scratch = _result(points + (taps,), _acc_dtype(q.dtype), q)
    results = (_result(q.shape, q.dtype, q), _result(k.shape, k.dtype, q),
               _result(v.shape, v.dtype, q), scratch, scratch)
    call = jax.ffi.ffi_call("sapa_backward", results)
    dq, dk, dv, _, _ = call(q, k, v, stats, g, **opts.attributes())
    return dq, dk, dv


@functools.lru_cache(maxsize=None)
def _partitioned_calls(opts: Options):
    """The forward and backward calls for `opts`, batch-partitioned and vmappable."""
    # Closures with plain positional signatures: custom_partitioning binds arguments by name.
    forward = batch_partitioned(lambda q, k, v: forward_call(q, k, v, opts),
                                arg_ranks=(4, 4, 4), out_ranks=(4, 4))
    backward = batch_partitioned(lambda q, k, v, stats, g: backward_call(q, k, v, stats, g, opts),
                                 arg_ranks=(4, 4, 4, 4, 4), out_ranks=(4, 4, 4))
    return forward, backward


def _reference(opts: Options):
    """The jnp formulation of `opts` (forward mode and higher orders), computed in at least
    float32 and returned in the input dtype, as the kernels do."""
    names = dict(normalizer=attribute_name("normalizers", opts.normalizer),
                 border=attribute_name("borders", opts.border))

    def upsample(q, k, v):
        compute = jnp.promote_types(q.dtype, jnp.float32)
        out = reference.sapa_upsample(*(a.astype(compute) for a in (q, k, v)),
                                      kernel_size=opts.kernel_size, scale=opts.scale,
                                      eps=opts.eps, **names)
        return out.astype(q.dtype)
    return upsample


@functools.lru_cache(maxsize=None)
def _differentiable(opts: Options):
    """The fused core for `opts`: first-order reverse mode on the two kernels, every other
    derivative through `_autodiff` (docs/design.md section 4). Jitted so that eager calls on
    sharded arrays are partitioned too, instead of gathering the batch."""
    return jax.jit(_autodiff.differentiable_core(*_partitioned_calls(opts), _reference(opts)))


def _sapa(q, k, v, opts: Options):
    return _differentiable(opts)(q, k, v)


def sapa_upsample(q, k, v, *, kernel_size, scale, normalizer, border, eps):
    """Fused SAPA core on validated inputs (see `sapa_jax.core.sapa_upsample`).

    q, k, v are cast to their common dtype, which is also the dtype of the result.
    """
    dtype = jnp.result_type(q, k, v)
    q, k, v = (jnp.asarray(a, dtype) for a in (q, k, v))
    opts = Options(int(kernel_size), int(scale), attribute_code("normalizers", normalizer),
                   attribute_code("borders", border), float(eps))
    return _sapa(q, k, v, opts)


# ============================================================================= SAPA-D
# The fused SAPA-D kernels (docs/design.md section 6): "sapa_deform_forward" and
# "sapa_deform_backward", registered by the same modules as SAPA's.

DEFORM_TARGETS = ("sapa_deform_forward", "sapa_deform_backward")


def deform_built(platform: str) -> bool:
    """Did the kernel module of `platform` register the SAPA-D targets?"""
    return targets_built(platform, DEFORM_TARGETS)


class DeformOptions(NamedTuple):
    """Static options of one SAPA-D kernel call."""
    num_points: int
    groups: int
    scale: int

    def attributes(self):
        return {name: np.int64(value) for name, value in self._asdict().items()}


def deform_forward_call(q, k, v, offsets, opts: DeformOptions):
    """One "sapa_deform_forward" call: (out,)."""
    result = _result(q.shape[:-1] + (v.shape[-1],), q.dtype, q)
    return (jax.ffi.ffi_call("sapa_deform_forward", result)(q, k, v, offsets,
                                                            **opts.attributes()),)


def deform_backward_call(q, k, v, offsets, g, opts: DeformOptions):
    """One "sapa_deform_backward" call: (dq, dk, dv, doffsets)."""
    results = tuple(_result(a.shape, a.dtype, q) for a in (q, k, v, offsets))
    return tuple(jax.ffi.ffi_call("sapa_deform_backward", results)(q, k, v, offsets, g,
                                                                   **opts.attributes()))


@functools.lru_cache(maxsize=None)
def _deform_differentiable(opts: DeformOptions):
    """The fused SAPA-D core for `opts`: reverse mode on the two kernels (a custom_vjp that
    saves only the inputs); batch-partitioned and vmappable like SAPA's calls."""
    forward = batch_partitioned(lambda q, k, v, o: deform_forward_call(q, k, v, o, opts),
                                arg_ranks=(4, 4, 4, 4), out_ranks=(4,))
    backward = batch_partitioned(
        lambda q, k, v, o, g: deform_backward_call(q, k, v, o, g, opts),
        arg_ranks=(4, 4, 4, 4, 4), out_ranks=(4, 4, 4, 4))

    @jax.custom_vjp
    def upsample(q, k, v, offsets):
        return forward(q, k, v, offsets)[0]

    def upsample_fwd(q, k, v, offsets):
        return upsample(q, k, v, offsets), (q, k, v, offsets)

    def upsample_bwd(residuals, g):
        return tuple(backward(*residuals, g.astype(residuals[0].dtype)))

    upsample.defvjp(upsample_fwd, upsample_bwd)
    return jax.jit(upsample)


def deform_upsample(q, k, v, offsets, *, num_points, groups, scale):
    """Fused SAPA-D core on validated inputs (see `sapa_jax.deform.deform_upsample`); the four
    arrays are cast to their common dtype, which is also the dtype of the result."""
    dtype = jnp.result_type(q, k, v, offsets)
    q, k, v, offsets = (jnp.asarray(a, dtype) for a in (q, k, v, offsets))
    return _deform_differentiable(DeformOptions(int(num_points), int(groups), int(scale)))(
        q, k, v, offsets)
# ============================================================================== CARAFE
# The fused CARAFE core (docs/design.md section 5): "carafe_forward(x, logits) -> (out, stats)"
# and "carafe_backward(x, logits, stats, g) -> (dx, dlogits, w_scratch)", attributes
# kernel_size, scale, groups, normalizer (the codes above), eps. stats (n, sH, sW, 2 * groups)
# holds the two numbers of SAPA's stats per group, in the accumulation type.

CARAFE_TARGETS = ("carafe_forward", "carafe_backward")
# platform -> the largest kernel_size its CARAFE kernel takes (xla_ffi/carafe_cuda.cu: at most
# four taps per lane); absent: no limit beyond the shared validation's.
CARAFE_MAX_KERNEL_SIZE = {"gpu": 11}


def carafe_built(platform: str) -> bool:
    """Did the kernel module of `platform` register the CARAFE targets?"""
    return targets_built(platform, CARAFE_TARGETS)


class CarafeOptions(NamedTuple):
    """Static options of one CARAFE kernel call (hashable, like `Options`)."""
    kernel_size: int
    scale: int
    groups: int
    normalizer: int
    eps: float

    def attributes(self):
        return dict(kernel_size=np.int64(self.kernel_size), scale=np.int64(self.scale),
                    groups=np.int64(self.groups), normalizer=np.int64(self.normalizer),
                    eps=np.float64(self.eps))


def carafe_forward_call(x, logits, opts: CarafeOptions):
    """One "carafe_forward" call: (out, stats)."""
    points = logits.shape[:-1]
    results = (_result(points + (x.shape[-1],), x.dtype, logits),
               _result(points + (2 * opts.groups,), _acc_dtype(x.dtype), logits))
    return jax.ffi.ffi_call("carafe_forward", results)(x, logits, **opts.attributes())


def carafe_backward_call(x, logits, stats, g, opts: CarafeOptions):
    """One "carafe_backward" call: (dx, dlogits); the weights scratch is dropped."""
    scratch = _result(logits.shape, _acc_dtype(x.dtype), logits)
    results = (_result(x.shape, x.dtype, logits), _result(logits.shape, logits.dtype, logits),
               scratch)
    dx, dlogits, _ = jax.ffi.ffi_call("carafe_backward", results)(x, logits, stats, g,
                                                                   **opts.attributes())
    return dx, dlogits


@functools.lru_cache(maxsize=None)
def _carafe_differentiable(opts: CarafeOptions):
    """The fused CARAFE core for `opts` on SAPA's derivative wiring (`_autodiff`).

    `_autodiff.differentiable_core` takes a core of three operands (q, k, v) with the output
    `q.shape[:-1] + (v.shape[-1],)`. CARAFE's two fit it as q = logits and v = x, with x
    passed once more in the k slot, where nothing reads it: the backward returns zeros for it
    (XLA drops the add), the jnp formulation ignores it, so its tangent contributes nothing.
    """
    from .carafe import reference_carafe  # carafe imports this module

    forward = batch_partitioned(lambda x, logits: carafe_forward_call(x, logits, opts),
                                arg_ranks=(4, 4), out_ranks=(4, 4))
    backward = batch_partitioned(
        lambda x, logits, stats, g: carafe_backward_call(x, logits, stats, g, opts),
        arg_ranks=(4, 4, 4, 4), out_ranks=(4, 4))
    names = dict(kernel_size=opts.kernel_size, scale=opts.scale, groups=opts.groups,
                 normalizer=attribute_name("normalizers", opts.normalizer), eps=opts.eps)

    def reference(logits, unused, x):
        del unused
        compute = jnp.promote_types(x.dtype, jnp.float32)
        out = reference_carafe(x.astype(compute), logits.astype(compute), **names)
        return out.astype(x.dtype)

    def backward3(logits, unused, x, stats, g):
        dx, dlogits = backward(x, logits, stats, g)
        return dlogits, jnp.zeros_like(unused), dx

    core = _autodiff.differentiable_core(lambda logits, unused, x: forward(x, logits),
                                         backward3, reference)
    return jax.jit(lambda x, logits: core(logits, x, x))


def carafe_upsample(x, logits, *, kernel_size, scale, groups, normalizer, eps):
    """Fused CARAFE core on validated inputs (see `sapa_jax.carafe.carafe_upsample`); x and
    logits are cast to their common dtype, which is also the dtype of the result."""
    dtype = jnp.result_type(x, logits)
    x, logits = jnp.asarray(x, dtype), jnp.asarray(logits, dtype)
    opts = CarafeOptions(int(kernel_size), int(scale), int(groups),
                         attribute_code("normalizers", normalizer), float(eps))
    return _carafe_differentiable(opts)(x, logits)
