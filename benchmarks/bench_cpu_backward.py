"""The fused SAPA backward call alone at the CPU preset, CPU time per call on one worker, for
side-by-side comparisons of two builds of the CPU module (load each in its own process, alternate).

    python benchmarks/bench_cpu_backward.py PATH/_sapa_cpu...so CALLS [workers] [level]
        [normalizer] [border]

Prints the SIMD level, a hash of (dq, dk, dv) (same bits?) and the median and minimum CPU time.
"""
import sys, time, hashlib, importlib.util, statistics
so, n = sys.argv[1], int(sys.argv[2])
workers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
level = sys.argv[4] if len(sys.argv) > 4 else "auto"
spec = importlib.util.spec_from_file_location("sapa_jax._sapa_cpu", so)
mod = importlib.util.module_from_spec(spec); sys.modules["sapa_jax._sapa_cpu"] = mod
spec.loader.exec_module(mod)
import jax, jax.numpy as jnp, numpy as np
from sapa_jax import _ffi
mod.set_max_workers(workers); mod.set_simd_level(level)
B, H, W, s, d, C, K = 2, 32, 32, 2, 32, 64, 5
rng = np.random.default_rng(0)
q = rng.standard_normal((B, H*s, W*s, d)).astype(np.float32) * d ** -0.25
k = rng.standard_normal((B, H, W, d)).astype(np.float32) * d ** -0.25
v = rng.standard_normal((B, H, W, C)).astype(np.float32)
g = rng.standard_normal((B, H*s, W*s, C)).astype(np.float32)
normalizer = sys.argv[5] if len(sys.argv) > 5 else "softmax"
border = sys.argv[6] if len(sys.argv) > 6 else "zeros"
opts = _ffi.Options(K, s, _ffi.attribute_code("normalizers", normalizer),
                    _ffi.attribute_code("borders", border), 1e-6)
fwd = jax.jit(lambda q, k, v: _ffi.forward_call(q, k, v, opts))
out, stats = fwd(q, k, v)
bwd = jax.jit(lambda q, k, v, st, g: _ffi.backward_call(q, k, v, st, g, opts))
r = jax.block_until_ready(bwd(q, k, v, stats, g))
h = hashlib.sha1(b"".join(np.asarray(x).tobytes() for x in r)).hexdigest()[:12]
ts = []
for _ in range(n):
    t0 = time.process_time()
    jax.block_until_ready(bwd(q, k, v, stats, g))
    ts.append(time.process_time() - t0)
print(f"{so.split('/')[-1]} level={mod.simd_level()} hash={h} "
      f"cpu_ms median={1e3 * statistics.median(ts):.3f} min={1e3 * min(ts):.3f}")
