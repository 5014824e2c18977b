#!/usr/bin/env python3
"""Static cost report of the CUDA kernels: SASS hot loops, resources and tile plans (issue 15).

Runs without a GPU. Steps:

1. Build. The CUDA sources of the `_sapa_cuda` target (read from CMakeLists.txt) are compiled
   by nvcc to one sm_90 cubin each (`-cubin -O3 -lineinfo`, the module's flags), with ptxas'
   `--resource-usage` report: registers, stack and spill bytes per kernel. Static shared
   memory comes from `cuobjdump -res-usage`; the dynamic shared memory of the tiled kernels
   is the planner's, below.
2. Disassemble. `nvdisasm -gi` prints the SASS with, before each instruction whose source
   position changes, its whole inline chain: the innermost source line first ("line N inlined
   at ... line M"), the kernel's own line last.
3. Find the loops. A loop is a branch to an address at or before its own (a backward branch):
   its body is the address range [target, branch]. No loop analysis beyond that is needed:
   nvcc lays loops out contiguously.
4. Name each loop's role. Every instruction is charged to the *kernel's direct callee* in its
   inline chain (the second-outermost frame: e.g. `accumulate_dots` for a q.k product inlined
   through a lambda into `forward_tiled`), found from the source line by the extents of the
   functions in the source file (a brace-matching scan). A loop's role is the callee most of
   its instructions belong to. So a role is a source function, and the report is stable across
   code motion as long as each hot loop lives in its own device function (the kernels are
   written that way on purpose).
5. Pick the tap loop of each role (ROLES below): the loop whose backward branch sits on the
   source line of the role's tap-loop header (`TAP_LOOP` text, searched inside the function),
   or, for the v2 kernels whose taps are fully unrolled, the role's innermost loop holding its
   FFMAs (one iteration = all T taps of `items` work items). Instructions per tap = static
   instructions in the loop's range / taps per iteration; FFMA per tap likewise, counted in the
   SASS (FFMA and FFMA2-like opcodes), not assumed. Inner loops nested in a tap loop are counted
   once: at the preset (s = 2, so s*s padded to 4 is one group) they run once per tap. The count
   is static: the out-of-map `continue` paths of the generic kernels are included although an
   inside tap skips them, which is what the issue's review counted too.
6. Plans. The tile planner (`make_plan`) is compiled on the CPU through the emulator
   (tests/cuda_emulator) and asked for each tiled kernel at the GPU preset (B=8, 64x64 ->
   128x128, C=256, d=32, K=5) and at B=1, 120x120 -> 240x240, C=256 (the authors' published
   timing shape), on an H100/H200 (132 SMs, 227 KiB opt-in and 228 KiB per SM: both have the
   same SM count and shared memory). Waves = blocks / (132 * resident blocks per SM), residency
   limited by shared memory (+1 KiB reserved per block), registers (from step 1) and threads.
   The v2 kernels' plans come from the planner's cost model (xla_ffi/cuda/plan.h cost_plan):
   tile and channel split of least modelled time, with the halo ratio and the modelled time.

Output lines (parsed by tests/test_sass_report.py):
    LOOP <kernel>/<role>: <N> instructions per tap, <F> FFMA per tap
    STAGE <kernel>/<role>: <N> instructions per row
    KERNEL <kernel>: <R> registers, <S> spill bytes, <M> bytes static shared, <L> bytes local
    PLAN <shape>/<kernel>: tile <TH>x<TW>, split <S>, <B> blocks, <X> bytes shared, <P> per SM,
        <W> waves, halo <R>, model <M> us
   (split: blocks per tile, each over a share of the channels; halo: staged / useful elements of
   a block; model: the v2 planner's modelled time, "-" for the generic kernels it does not plan)

Usage: python scripts/sass_report.py [--arch sm_90] [--keep DIR] [--no-plans]
       [--cubin CUBIN PTXAS_LOG]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
H100_SMS, H100_OPTIN, H100_PER_SM = 132, 232448, 233472  # H100 SXM and H200 alike
THREADS = 256
PRESET = dict(K=5, s=2, d=32, C=256)

# role -> (kind, loop header, taps per iteration). The header is the loop's source text in the
# role's function, or (helper, text) for a loop in a helper the role calls, or None.
# kind "tap": a LOOP line; "stage": a STAGE line (rows instead of taps).
# Taps per iteration: ("ffma", F) = the loop's FFMAs (outside its inner loops) // F, for the
# generic kernels, whose runtime tap loops nvcc unrolls by 2 or 4 and F is the source's FFMA count
# of one tap at the preset (32 channels per q.k; 4 sub-pixels x 2 channels per assembly tap;
# s*s = 4 per gather tap); ("fixed", n) = n, or n(PRESET) when callable.
ROLES = {
    "accumulate_dots": ("tap", "for (int dx = -P.r; dx <= P.r; ++dx, ++p) {", ("ffma", 32)),
    "assemble_chunk": ("tap", "for (int dx = -P.r; dx <= P.r; ++dx, ++p) {", ("ffma", 8)),
    "gather_chunk": ("tap", "for (int dx = -P.r; dx <= P.r; ++dx, ++p) {", ("ffma", 4)),
    "stage_halo": ("stage", "for (int pix = warp; pix < npix; pix += kWarps) {", ("fixed", 4)),
    "stage_points": ("stage", "for (int pt = warp; pt < npts; pt += kWarps) {", ("fixed", 4)),
    "stage_halo_points": ("stage", "for (int i = warp; i < npts; i += kWarps) {", ("fixed", 4)),
}
# v2 roles (xla_ffi/cuda/v2_*.cuh): taps fully unrolled, so the role's innermost FFMA loop is
# the loop over work items and one iteration runs all K*K taps of one item.
V2_ROLES = {
    "logits_unrolled": ("tap", None, ("fixed", lambda p: p["K"] ** 2)),
    "assemble_unrolled": ("tap", None, ("fixed", lambda p: p["K"] ** 2)),
    # f32 staging at the preset: the 16-byte cp.async loops of v2_stage.cuh's helpers, each
    # iteration a warp's 32 x 16 bytes = 4 rows of 32 channels
    "stage_padded": ("stage", ("stage_padded_vectors", "for (int hx = first; hx < h.cols; "
                                                       "hx += step, at += step * row_len) {"),
                     ("fixed", 4)),
    # a strip of 2 low-res points per thread: 2 K*K point-taps per iteration
    "gather_strips": ("tap", None, ("fixed", lambda p: 2 * p["K"] ** 2)),
    "stage_points_padded": ("stage", ("stage_points_vectors", "for (int col = first; col < "
                                      "h.cols * S; col += step, at += step * row_len) {"),
                            ("fixed", 4)),
    # backward pass 1 (v2_points.cuh): per output point, all K*K taps of the normalisation and
    # logit gradient; then dq, one (centre, 4 sub-pixels, channel) item per iteration
    "point_gradients": ("tap", None, ("fixed", lambda p: p["K"] ** 2)),
    "assemble_dq": ("tap", None, ("fixed", lambda p: p["K"] ** 2)),
}

# The tiled kernels and their planner Kernel index (the enum's order in the CUDA planner).
PLAN_KERNEL_INDEX = {"forward_tiled": 0, "backward_points_tiled": 1, "backward_gather_tiled": 2,
                     "backward_lowres_tiled": 2, "forward_v2": 3, "backward_gather_v2": 4,
                     "backward_points_v2": 5}
SHAPES = {"gpu-preset B8 64->128": (8, 64, 64), "authors B1 120->240": (1, 120, 120)}


class ToolMissing(RuntimeError):
    pass


def tool(name: str) -> str:
    """nvcc from PATH; cuobjdump and nvdisasm from PATH, the CUDA install or the pip wheels
    nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm."""
    found = shutil.which(name)
    if found:
        return found
    candidates = [pathlib.Path(p) / "bin" / name for p in
                  (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda")]
    try:
        import nvidia
        for root in nvidia.__path__:
            candidates += list(pathlib.Path(root).glob(f"cu*/bin/{name}"))
    except ImportError:
        pass
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(pathlib.Path(os.path.realpath(nvcc)).parent / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise ToolMissing(f"{name} not found (PATH, CUDA_HOME, /usr/local/cuda, pip nvidia-cuda-{name})")


def cuda_sources() -> list[pathlib.Path]:
    text = (REPO / "CMakeLists.txt").read_text()
    m = re.search(r"pybind11_add_module\(\s*_sapa_cuda\s+MODULE\s+([^)]*)\)", text)
    if not m:
        raise RuntimeError("CMakeLists.txt: no pybind11_add_module(_sapa_cuda MODULE ...)")
    return [REPO / f for f in m[1].split() if f.endswith(".cu")]


def ffi_include() -> str:
    import jax.ffi
    return jax.ffi.include_dir()


def build(out: pathlib.Path, arch: str) -> tuple[list[pathlib.Path], str]:
    """cubins of the CUDA sources and ptxas' resource report."""
    nvcc = tool("nvcc")
    cubins, log = [], []
    for src in cuda_sources():
        cubin = out / (src.stem + ".cubin")
        cmd = [nvcc, "-cubin", f"-arch={arch}", "-O3", "-lineinfo", "-std=c++17",
               f"-I{REPO / 'xla_ffi'}", "-isystem", ffi_include(), "--resource-usage",
               str(src), "-o", str(cubin)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {src}:\n{proc.stderr[-4000:]}")
        cubins.append(cubin)
        log.append(proc.stdout + proc.stderr)
    return cubins, "\n".join(log)


# ---------------------------------------------------------------------------------------------
# Source: function extents, so a line number names its function.

def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m[0]), text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r'"(?:\\.|[^"\\\n])*"', '""', text)


def function_extents(path: pathlib.Path) -> list[tuple[int, int, str]]:
    """(first line, last line, name) of every function body at namespace scope."""
    text = _strip_comments(path.read_text())
    text = "\n".join("" if l.lstrip().startswith("#") else l for l in text.split("\n"))
    extents, depth, start_pos, head_start = [], 0, None, 0
    fn_depth = None  # brace depth at which the current function body opened
    name = None
    ns_depths = []  # depths of open namespace / extern / struct blocks
    for i, ch in enumerate(text):
        if ch == "{":
            if fn_depth is None:
                head = text[head_start:i]
                if re.search(r"\b(namespace|struct|class|enum|union)\b[^()]*$", head) or \
                        re.search(r'extern\s*""\s*$', head) or "(" not in head:
                    ns_depths.append(depth)
                else:
                    names = re.findall(r"([~\w]+)\s*\((?:[^()]|\([^()]*\))*\)\s*"
                                       r"(?:const\s*)?(?:noexcept\s*)?(?:->[^{]*)?$", head.strip())
                    name = names[-1] if names else None
                    if name and name not in ("__launch_bounds__",):
                        fn_depth, start_pos = depth, i
                    else:
                        ns_depths.append(depth)
            depth += 1
        elif ch == "}":
            depth -= 1
            if fn_depth is not None and depth == fn_depth:
                extents.append((text.count("\n", 0, start_pos) + 1, text.count("\n", 0, i) + 1,
                                name))
                fn_depth = None
                head_start = i + 1
            elif ns_depths and ns_depths[-1] == depth:
                ns_depths.pop()
                head_start = i + 1
        elif ch == ";" and fn_depth is None:
            head_start = i + 1
    return extents


class SourceIndex:
    def __init__(self):
        self._ext: dict[str, list[tuple[int, int, str]]] = {}

    def function_at(self, file: str, line: int) -> str | None:
        if file not in self._ext:
            p = pathlib.Path(file)
            self._ext[file] = function_extents(p) if p.is_file() else []
        best = None
        for a, b, name in self._ext[file]:
            if a <= line <= b and (best is None or a >= best[0]):
                best = (a, name)
        return best[1] if best else None

    def line_of(self, file: str, function: str, text: str) -> int | None:
        """Line of `text` inside `function` of `file`."""
        self.function_at(file, 1)
        lines = pathlib.Path(file).read_text().split("\n")
        for a, b, name in self._ext[file]:
            if name == function:
                for n in range(a, b + 1):
                    if text in lines[n - 1]:
                        return n
        return None


# ---------------------------------------------------------------------------------------------
# SASS parsing.

LINE_INFO = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
LABEL = re.compile(r"^(\.L_x_\d+):")
FUNC = re.compile(r"^\s*\.text\.(\S+):")
BRANCH = re.compile(r"\b(BRA|BRX)\b[^`]*`\((\.L_x_\d+)\)")


@dataclasses.dataclass
class Instr:
    addr: int
    text: str
    chain: list[tuple[str, int]]  # innermost first

    @property
    def opcode(self) -> str:
        t = re.sub(r"^@!?U?P\w+\s+", "", self.text)
        return t.split()[0] if t else ""


@dataclasses.dataclass
class Function:
    symbol: str
    instrs: list[Instr]
    labels: dict[str, int]


def parse_sass(text: str) -> list[Function]:
    funcs: list[Function] = []
    cur = None
    chain: list[tuple[str, int]] = []
    pending: list[tuple[str, int]] = []
    for raw in text.split("\n"):
        m = FUNC.match(raw)
        if m:
            cur = Function(m[1], [], {})
            funcs.append(cur)
            chain, pending = [], []
            continue
        if cur is None:
            continue
        m = LINE_INFO.search(raw)
        if m:
            pending.append((m[1], int(m[2])))
            continue
        m = LABEL.match(raw.strip())
        if m:
            cur.labels[m[1]] = len(cur.instrs)  # index of the next instruction
            continue
        m = INSTR.match(raw)
        if m:
            if pending:
                chain, pending = pending, []
            cur.instrs.append(Instr(int(m[1], 16), m[2], chain))
    return funcs


@dataclasses.dataclass
class Loop:
    start: int  # instruction indices, inclusive
    end: int
    role: str | None = None
    branch_line: tuple[str, int] | None = None

    def contains(self, other: "Loop") -> bool:
        return self.start <= other.start and other.end <= self.end and self != other


def find_loops(fn: Function) -> list[Loop]:
    loops = []
    for i, ins in enumerate(fn.instrs):
        m = BRANCH.search(ins.text)
        if m and m[2] in fn.labels and fn.labels[m[2]] <= i:
            loops.append(Loop(fn.labels[m[2]], i, branch_line=ins.chain[0] if ins.chain else None))
    return loops


def callee_of(ins: Instr, index: SourceIndex) -> str | None:
    """The kernel's direct callee the instruction belongs to (the kernel itself if none)."""
    names = [index.function_at(f, l) for f, l in ins.chain]
    names = [n for n in names if n]
    if not names:
        return None
    kernel = names[-1]
    below = [n for n in names[:-1] if n != kernel]
    return below[-1] if below else kernel


def assign_roles(fn: Function, loops: list[Loop], index: SourceIndex) -> None:
    for lp in loops:
        counts: dict[str, int] = {}
        for ins in fn.instrs[lp.start:lp.end + 1]:
            c = callee_of(ins, index)
            if c:
                counts[c] = counts.get(c, 0) + 1
        lp.role = max(counts, key=counts.get) if counts else None


def is_ffma(op: str) -> bool:
    return op.split(".")[0] in ("FFMA", "FFMA2", "HFMA2")


def kernel_name(symbol: str, globals_: set[str]) -> tuple[str, str] | None:
    """(kernel, template-args) for a mangled kernel symbol; None for other functions."""
    for g in sorted(globals_, key=len, reverse=True):
        m = re.search(rf"\d+{re.escape(g)}I(.*?)EE?v", symbol)
        if m:
            return g, m[1]
    return None


def global_kernels(paths: list[pathlib.Path]) -> set[str]:
    names = set()
    for p in paths:
        for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)",
                             p.read_text()):
            names.add(m[1])
    return names


def is_f32_preset(targs: str) -> bool:
    """The float instantiation; for kernels specialised on (K, s), the preset's K=5, s=2."""
    if not targs.startswith("f"):
        return False
    ints = re.findall(r"Li(\d+)", targs)
    return not ints or ints[:2] == [str(PRESET["K"]), str(PRESET["s"])]


@dataclasses.dataclass
class LoopReport:
    kernel: str
    role: str
    kind: str
    instructions: float
    ffma: float


def format_loop(r: LoopReport) -> str:
    if r.kind == "tap":
        return (f"LOOP {r.kernel}/{r.role}: {r.instructions:.1f} instructions per tap, "
                f"{r.ffma:.1f} FFMA per tap")
    return f"STAGE {r.kernel}/{r.role}: {r.instructions:.1f} instructions per row"


def disassemble(cubin: pathlib.Path) -> str:
    return subprocess.run([tool("nvdisasm"), "-gi", "-c", str(cubin)], capture_output=True,
                          text=True, check=True).stdout


def analyse(funcs: list[Function], kernels: set[str], index: SourceIndex,
            source_files: list[pathlib.Path], roles: dict | None = None) -> list[LoopReport]:
    """The tap and staging loops of the float32 (preset-specialised) kernels, per role."""
    out = []
    roles = roles if roles is not None else {**ROLES, **V2_ROLES}
    for fn in funcs:
        kn = kernel_name(fn.symbol, kernels)
        if not kn or not is_f32_preset(kn[1]):
            continue
        kernel = kn[0]
        loops = find_loops(fn)
        assign_roles(fn, loops, index)
        for role, (kind, header, per_iter) in roles.items():
            mine = [lp for lp in loops if lp.role == role]
            if not mine:
                continue
            chosen = None
            if header is not None:
                # the header is in the role's function, or in a (helper, header) it calls
                where, text = header if isinstance(header, tuple) else (role, header)
                lines = set()
                for f in source_files:
                    n = index.line_of(str(f), where, text)
                    if n:
                        lines.add((str(f), n))
                on_header = [lp for lp in mine if lp.branch_line in lines]
                if on_header:  # a compiler-split copy (remainder loop) is the smaller one
                    chosen = max(on_header, key=lambda lp: lp.end - lp.start)
            if chosen is None:
                with_ffma = [lp for lp in mine if any(is_ffma(i.opcode) for i in
                                                      fn.instrs[lp.start:lp.end + 1])]
                inner = [lp for lp in with_ffma if not any(lp.contains(o) for o in with_ffma)]
                if not inner:
                    continue
                # Several copies (the first-chunk variant that stores, the later-chunk one that
                # adds): the smallest is the one the preset runs (d = 32 is a single chunk).
                chosen = min(inner, key=lambda lp: lp.end - lp.start)
            inner = [lp for lp in loops if chosen.contains(lp)]
            body = [ins for i, ins in enumerate(fn.instrs[chosen.start:chosen.end + 1],
                                                chosen.start)
                    if not any(lp.start <= i <= lp.end for lp in inner)]
            ffma = sum(is_ffma(i.opcode) for i in body)
            how, n = per_iter
            taps = max(1, ffma // n) if how == "ffma" else (n(PRESET) if callable(n) else n)
            out.append(LoopReport(kernel, role, kind, len(body) / taps, ffma / taps))
    return out


# ---------------------------------------------------------------------------------------------
# Resources.

PTXAS_FN = re.compile(r"Function properties for (\S+)")
PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")
RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclasses.dataclass
class Resources:
    registers: int = 0
    spill_bytes: int = 0
    stack: int = 0
    shared: int = 0
    local: int = 0


def resources(ptxas_log: str, cubins: list[pathlib.Path]) -> dict[str, Resources]:
    res: dict[str, Resources] = {}
    cur = None
    for line in ptxas_log.split("\n"):
        m = PTXAS_FN.search(line)
        if m:
            cur = res.setdefault(m[1], Resources())
            continue
        m = PTXAS_SPILL.search(line)
        if m and cur:
            cur.stack, cur.spill_bytes = int(m[1]), int(m[2]) + int(m[3])
        m = PTXAS_REGS.search(line)
        if m and cur:
            cur.registers = int(m[1])
    cuobjdump = tool("cuobjdump")
    for cubin in cubins:
        text = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
        for m in RES.finditer(text):
            r = res.setdefault(m[1], Resources())
            r.registers = int(m[2])
            r.stack, r.shared, r.local = int(m[3]), int(m[4]), int(m[5])
    return res


def resident_blocks(shared_bytes: int, registers: int) -> int:
    by_threads = 2048 // THREADS
    by_regs = 65536 // (max(registers, 1) * THREADS) if registers else by_threads
    by_smem = H100_PER_SM // (shared_bytes + 1024)
    return max(0, min(by_threads, by_regs, by_smem, 32))


def plans(kernel_regs: dict[str, int]) -> list[str]:
    """PLAN lines for the tiled kernels that the module has (kernel_regs' keys)."""
    return _plans([k for k in PLAN_KERNEL_INDEX if k in kernel_regs], kernel_regs)


def _plans(kernels: list[str], kernel_regs: dict[str, int]) -> list[str]:
    """PLAN lines from the emulator's make_plan (the CUDA planner compiled for the CPU)."""
    sys.path.insert(0, str(REPO / "tests"))
    from cuda_emulator import build as emu_build
    with tempfile.TemporaryDirectory() as d:
        emu = emu_build.build(pathlib.Path(d))
        lines = []
        for shape, (n, H, W) in SHAPES.items():
            for kernel in kernels:
                p = emu.plan_details(
                    PLAN_KERNEL_INDEX[kernel], n, H, W, PRESET["s"], PRESET["K"], PRESET["d"],
                    PRESET["C"], H100_OPTIN, H100_PER_SM, H100_SMS)
                lines.append(plan_line(shape, kernel, p, kernel_regs.get(kernel, 0)))
        return lines


def plan_line(shape: str, kernel: str, p: dict, registers: int) -> str:
    """One PLAN line. Generic kernels: halo = clipped halo pixels per tile pixel, no model (the
    cost model plans only the v2 kernels); v2: the planner's halo ratio and modelled time."""
    if not p["tiled"]:
        return f"PLAN {shape}/{kernel}: simple kernel"
    TH, TW, r = p["TH"], p["TW"], PRESET["K"] // 2
    per_sm = resident_blocks(p["shared_bytes"], registers)
    waves = p["blocks"] / (H100_SMS * per_sm) if per_sm else float("inf")
    if p["model_us"] > 0:
        halo, model = p["halo_ratio"], f"{p['model_us']:.1f} us"
    else:
        halo, model = (TH + 2 * r) * (TW + 2 * r) / (TH * TW), "-"
    return (f"PLAN {shape}/{kernel}: tile {TH}x{TW}, split {p['splits']}, {p['blocks']} blocks, "
            f"{p['shared_bytes']} bytes shared, {per_sm} per SM, {waves:.2f} waves, "
            f"halo {halo:.2f}, model {model}")


def report(arch: str, keep: pathlib.Path | None, with_plans: bool = True,
           prebuilt: tuple[pathlib.Path, pathlib.Path] | None = None) -> list[str]:
    work = keep or pathlib.Path(tempfile.mkdtemp(prefix="sass_report_"))
    work.mkdir(parents=True, exist_ok=True)
    if prebuilt:  # a cubin built as build() does, and nvcc's --resource-usage output
        cubins, log = [prebuilt[0]], prebuilt[1].read_text()
    else:
        cubins, log = build(work, arch)
    funcs = []
    for cubin in cubins:
        sass = disassemble(cubin)
        (work / (cubin.stem + ".sass")).write_text(sass)
        funcs += parse_sass(sass)
    sources = sorted({*cuda_sources(), *(REPO / "xla_ffi").rglob("*.cuh")})
    kernels = global_kernels(sources)
    index = SourceIndex()
    lines = [f"# sass_report: {arch}, nvcc {nvcc_version()}, preset K={PRESET['K']} "
             f"s={PRESET['s']} d={PRESET['d']} C={PRESET['C']}, float32 instantiations"]
    lines += [format_loop(r) for r in analyse(funcs, kernels, index, sources)]
    res = resources(log, cubins)
    regs = {}
    for symbol, r in sorted(res.items()):
        kn = kernel_name(symbol, kernels)
        if not kn or not is_f32_preset(kn[1]):
            continue
        regs[kn[0]] = r.registers
        lines.append(f"KERNEL {kn[0]}: {r.registers} registers, {r.spill_bytes} spill bytes, "
                     f"{r.shared} bytes static shared, {r.local} bytes local")
    if with_plans:
        lines.append(f"# plans on an H100/H200: {H100_SMS} SMs, {H100_OPTIN} B opt-in, "
                     f"{H100_PER_SM} B per SM")
        lines += plans(regs)
    if keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return lines


def nvcc_version() -> str:
    out = subprocess.run([tool("nvcc"), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\S+),", out)
    return m[1] if m else "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--keep", type=pathlib.Path, help="keep cubins and SASS in this folder")
    ap.add_argument("--no-plans", action="store_true", help="skip the planner (no g++ build)")
    ap.add_argument("--cubin", type=pathlib.Path, nargs=2, metavar=("CUBIN", "PTXAS_LOG"),
                    help="reuse a build: the sm_90 cubin of xla_ffi/sapa_cuda.cu (-lineinfo) "
                         "and nvcc's --resource-usage output")
    args = ap.parse_args(argv)
    try:
        lines = report(args.arch, args.keep, not args.no_plans, args.cubin)
    except ToolMissing as e:
        print(f"sass_report: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
