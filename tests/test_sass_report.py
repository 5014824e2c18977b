"""scripts/sass_report.py: its SASS parser, loop finder and role mapping on a small kernel that
nvcc builds in seconds (skipped without nvcc and nvdisasm), and its source scan on the real .cu.

The tiny kernel has a known shape: a device function `dot_taps` inlined into the kernel, whose
tap loop (`#pragma unroll 1`, so one iteration is one tap) does exactly 4 FFMA per tap, and a
staging function `stage_rows` with its own loop. The report must find both loops, charge them to
those functions through the inline chain, and print them in the documented format.
"""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import sass_report  # noqa: E402

LOOP_LINE = re.compile(r"^LOOP (\w+)/(\w+): (\d+\.\d) instructions per tap, (\d+\.\d) FFMA per tap$")
STAGE_LINE = re.compile(r"^STAGE (\w+)/(\w+): (\d+\.\d) instructions per row$")

TINY = r"""
__device__ __forceinline__ float4 dot_taps(const float4* __restrict__ w, const float* v, int n) {
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 1
  for (int p = 0; p < n; ++p) {  // tap loop
    const float x = v[p * 32];
    const float4 wp = w[p];
    acc.x = fmaf(wp.x, x, acc.x);
    acc.y = fmaf(wp.y, x, acc.y);
    acc.z = fmaf(wp.z, x, acc.z);
    acc.w = fmaf(wp.w, x, acc.w);
  }
  return acc;
}

__device__ __forceinline__ void stage_rows(float* dst, const float* __restrict__ src, int rows) {
#pragma unroll 1
  for (int i = threadIdx.x; i < rows; i += blockDim.x) dst[i] = src[i] * 2.f;  // row loop
}

template <typename T>
__global__ void tiny_kernel(const float4* __restrict__ w, const float* __restrict__ v,
                            float4* __restrict__ out, float* __restrict__ buf, int n) {
  stage_rows(buf, v, n);
  out[threadIdx.x] = dot_taps(w, buf + threadIdx.x, n);
}
template __global__ void tiny_kernel<float>(const float4*, const float*, float4*, float*, int);
"""

ROLES = {
    "dot_taps": ("tap", "for (int p = 0; p < n; ++p) {", ("fixed", 1)),
    "stage_rows": ("stage", "for (int i = threadIdx.x; i < rows; i += blockDim.x)", ("fixed", 1)),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    try:
        nvcc = sass_report.tool("nvcc")
        sass_report.tool("nvdisasm")
    except sass_report.ToolMissing as e:
        pytest.skip(str(e))
    d = tmp_path_factory.mktemp("sass")
    src = d / "tiny.cu"
    src.write_text(TINY)
    cubin = d / "tiny.cubin"
    subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-O3", "-lineinfo", str(src), "-o", str(cubin)],
                   check=True, capture_output=True)
    return src, sass_report.parse_sass(sass_report.disassemble(cubin))


def test_tiny_kernel_loops_and_format(tiny):
    src, funcs = tiny
    kernels = sass_report.global_kernels([src])
    assert kernels == {"tiny_kernel"}
    reports = sass_report.analyse(funcs, kernels, sass_report.SourceIndex(), [src], ROLES)
    lines = [sass_report.format_loop(r) for r in reports]
    taps = [m for m in map(LOOP_LINE.match, lines) if m]
    stages = [m for m in map(STAGE_LINE.match, lines) if m]
    assert [(m[1], m[2]) for m in taps] == [("tiny_kernel", "dot_taps")], lines
    assert [(m[1], m[2]) for m in stages] == [("tiny_kernel", "stage_rows")], lines
    assert float(taps[0][4]) == 4.0  # the 4 fmaf of one tap, counted in the SASS
    # a load of v, a 16-byte load of w, 4 FFMA, the counter and the branch at the least
    assert 7 <= float(taps[0][3]) <= 30
    assert float(stages[0][3]) >= 4  # load, multiply, store, branch


def test_every_loop_is_a_backward_branch(tiny):
    _, funcs = tiny
    fn = next(f for f in funcs if "tiny_kernel" in f.symbol)
    loops = sass_report.find_loops(fn)
    assert len(loops) >= 2
    for lp in loops:
        assert lp.start <= lp.end
        assert sass_report.BRANCH.search(fn.instrs[lp.end].text)


def test_function_extents_name_the_kernel_roles():
    """The role names of the report exist as functions in the CUDA sources it builds."""
    sources = sass_report.cuda_sources() + sorted((REPO / "xla_ffi").rglob("*.cuh"))
    names = {n for p in sources for _, _, n in sass_report.function_extents(p)}
    roles = {**sass_report.ROLES, **sass_report.V2_ROLES}
    missing = [r for r in roles if r not in names]
    assert not missing, f"roles of sass_report.ROLES / V2_ROLES not found in {sources}: {missing}"
    index = sass_report.SourceIndex()
    for role, (_, header, _) in roles.items():
        if header is None:
            continue
        where, text = header if isinstance(header, tuple) else (role, header)
        assert any(index.line_of(str(p), where, text) for p in sources), (role, header)
