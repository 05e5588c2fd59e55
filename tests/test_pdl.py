"""Programmatic dependent launch (issue 18) on the CPU: the FORGE_PDL switch, which kernels the launcher
gives the PDL attribute (the compile and launch functions mocked), that every kernel of a PDL file waits
for the previous kernel before anything else, and (where NVRTC is installed) what FORGE_PDL compiles."""

import re

import pytest
import torch

from forge.kernels import compiler


@pytest.mark.parametrize("value,on", [(None, False), ("", False), ("0", False), ("off", False), ("false", False),
                                      ("1", True), ("on", True), ("TRUE", True), (" 1 ", True)])
def test_parse_pdl(value, on):
    assert compiler.parse_pdl(value) is on


@pytest.mark.parametrize("value", ["2", "yes", "enabled"])
def test_parse_pdl_refuses_other_values(value):
    with pytest.raises(ValueError, match="FORGE_PDL"):
        compiler.parse_pdl(value)


def test_pdl_stays_off_without_a_gpu(monkeypatch, caplog):
    monkeypatch.setattr(compiler, "_pdl", None)
    monkeypatch.setattr(compiler, "available", lambda: False)
    monkeypatch.setenv("FORGE_PDL", "1")
    with caplog.at_level("INFO", logger="forge"):
        assert compiler.pdl_enabled() is False
    assert "programmatic dependent launch off" in caplog.text
    monkeypatch.setenv("FORGE_PDL", "0")
    assert compiler.pdl_enabled() is False  # read once


def test_pdl_needs_sm90(monkeypatch):
    monkeypatch.setattr(compiler, "_pdl", None)
    monkeypatch.setattr(compiler, "available", lambda: True)
    monkeypatch.setattr(compiler.torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert compiler.set_pdl(True) is False
    assert "sm_80" in compiler._pdl_unsupported()


class FakeKernel:
    def __init__(self, name):
        self.name = name
        self.handle = 0x1000 + len(name)


class FakeModule:
    def __init__(self, defines):
        self.defines = defines

    def get_kernel(self, name):
        return FakeKernel(name)


@pytest.fixture
def mocked(monkeypatch):
    """compiler with its caches emptied and compile / launch recorded instead of run."""
    calls = {"compiled": [], "plain": [], "pdl": []}
    for cache in ("_fast", "_kernels", "_modules", "_pdl_functions"):
        monkeypatch.setattr(compiler, cache, {})
    monkeypatch.setattr(compiler, "_pdl_refused", None)
    monkeypatch.setattr(compiler, "_ensure_device_current", lambda: 0)
    monkeypatch.setattr(compiler, "arch_of", lambda dev=None: "sm_90")
    monkeypatch.setattr(compiler.torch.cuda, "current_device", lambda: 0)

    def compile_source(file, defines, arch):
        calls["compiled"].append((file, dict(defines)))
        return FakeModule(defines)

    monkeypatch.setattr(compiler, "compile_source", compile_source)
    monkeypatch.setattr(compiler, "_cu_function", lambda kernel: ("function", kernel.handle))
    monkeypatch.setattr(compiler, "LaunchConfig", lambda **kw: kw)
    monkeypatch.setattr(compiler, "current_stream", lambda: "stream")
    monkeypatch.setattr(compiler, "launch", lambda stream, config, kernel, *args: calls["plain"].append(
        (kernel.name, config, args)))
    monkeypatch.setattr(compiler, "_launch_pdl", lambda function, grid, block, shmem, args: calls["pdl"].append(
        (function, grid, block, shmem, args)))
    return calls


def test_pdl_kernels_compile_with_the_define_and_launch_with_the_attribute(monkeypatch, mocked):
    monkeypatch.setattr(compiler, "_pdl", True)
    kernel = compiler.get_kernel("norm.cu", "rms_norm_kernel", None, VEC=8)
    assert mocked["compiled"] == [("norm.cu", {"VEC": 8, "FORGE_PDL": 1})]
    compiler.run(kernel, 4, 128, 1, 2, shmem=64)
    assert mocked["pdl"] == [(("function", kernel.handle), 4, 128, 64, (1, 2))] and mocked["plain"] == []


def test_pdl_off_compiles_and_launches_as_before(monkeypatch, mocked):
    monkeypatch.setattr(compiler, "_pdl", False)
    kernel = compiler.get_kernel("norm.cu", "rms_norm_kernel", None, VEC=8)
    assert mocked["compiled"] == [("norm.cu", {"VEC": 8})]
    compiler.run(kernel, (2, 3), 64, 7)
    assert mocked["plain"] == [("rms_norm_kernel", {"grid": (2, 3), "block": 64, "shmem_size": 0}, (7,))]
    assert mocked["pdl"] == []


def test_only_pdl_files_get_the_attribute(monkeypatch, mocked):
    """A kernel of a file that has no wait (not in PDL_FILES) would race: it launches as before."""
    monkeypatch.setattr(compiler, "_pdl", True)
    kernel = compiler.get_kernel("other.cu", "k", None)
    assert mocked["compiled"] == [("other.cu", {})]
    compiler.run(kernel, 1, 32)
    assert [c[0] for c in mocked["plain"]] == ["k"] and mocked["pdl"] == []


def test_switching_pdl_gives_each_state_its_own_build(monkeypatch, mocked):
    monkeypatch.setattr(compiler, "_pdl", False)
    plain = compiler.get_kernel("activation.cu", "silu_mul_kernel", None, VEC=8)
    monkeypatch.setattr(compiler, "_pdl", True)
    pdl = compiler.get_kernel("activation.cu", "silu_mul_kernel", None, VEC=8)
    assert plain is not pdl
    monkeypatch.setattr(compiler, "_pdl", False)
    assert compiler.get_kernel("activation.cu", "silu_mul_kernel", None, VEC=8) is plain
    compiler.run(plain, 1, 32)
    compiler.run(pdl, 1, 32)  # (a PDL build keeps its attribute: it waits, so it is safe either way)
    assert len(mocked["plain"]) == 1 and len(mocked["pdl"]) == 1


def test_a_refused_pdl_launch_falls_back_and_turns_pdl_off(monkeypatch, mocked, caplog):
    """cuLaunchKernelEx refusing the attribute (an old driver, a capture mode that does not take it) is not a
    crash: that launch goes through cuda.core without it (a FORGE_PDL=1 build is correct either way), one
    warning says why, and PDL stays off afterwards."""
    monkeypatch.setattr(compiler, "_pdl", True)
    kernel = compiler.get_kernel("norm.cu", "rms_norm_kernel", None, VEC=8)
    monkeypatch.setattr(compiler, "_launch_pdl", lambda *a: mocked["pdl"].append(a) or "CUDA_ERROR_NOT_SUPPORTED")
    with caplog.at_level("WARNING", logger="forge"):
        compiler.run(kernel, 4, 128, 1, 2, shmem=64)
    assert len(mocked["pdl"]) == 1
    assert mocked["plain"] == [("rms_norm_kernel", {"grid": 4, "block": 128, "shmem_size": 64}, (1, 2))]
    assert "CUDA_ERROR_NOT_SUPPORTED" in caplog.text and compiler.pdl_enabled() is False
    compiler.run(kernel, 4, 128, 1, 2, shmem=64)
    assert len(mocked["pdl"]) == 1 and len(mocked["plain"]) == 2
    assert mocked["compiled"][-1] == ("norm.cu", {"VEC": 8, "FORGE_PDL": 1})
    compiler.get_kernel("norm.cu", "rms_norm_kernel", None, VEC=8)
    assert mocked["compiled"][-1] == ("norm.cu", {"VEC": 8})  # later kernels: the builds without PDL
    monkeypatch.setattr(compiler, "available", lambda: True)
    assert compiler.set_pdl(True) is False  # (its PDL builds would launch without the attribute)
    assert "refused" in compiler._pdl_unsupported()


def test_dim3():
    assert compiler._dim3(5) == (5, 1, 1)
    assert compiler._dim3((2, 3)) == (2, 3, 1)
    assert compiler._dim3((2, 3, 4)) == (2, 3, 4)


def functions(source: str, qualifier: str) -> dict[str, tuple[str, str]]:
    """{name: (parameter list, body)} of every `qualifier` (__global__ / __device__) function of source."""
    found = {}
    pattern = qualifier + r"\s+(?:__forceinline__\s+)?\w+\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\("
    for m in re.finditer(pattern, source):
        start = source.index("{", m.end())
        if ";" in source[m.end():start].split(")")[-1]:  # a declaration
            continue
        depth, i = 0, start
        while True:
            depth += {"{": 1, "}": -1}.get(source[i], 0)
            if depth == 0:
                break
            i += 1
        found[m.group(1)] = (source[m.end():start], source[start + 1:i])
    return found


WAIT = "forge_wait_prior_grid();"


def prologue(body: str, params: str, helpers: dict) -> tuple[str, str] | None:
    """The code (and pointer parameters) a kernel runs before its first wait: its own, or up to a call of
    the helper that waits; None if it never waits."""
    if WAIT in body:
        return body[: body.index(WAIT)], params
    for m in re.finditer(r"\b(\w+)\s*(?:<[^;>]*>)?\s*\(", body):
        helper = helpers.get(m.group(1))
        inner = helper and prologue(helper[1], helper[0], helpers)
        if inner:
            return body[: m.start()] + inner[0], params + "," + inner[1]
    return None


@pytest.mark.parametrize("file", sorted(compiler.PDL_FILES))
def test_every_kernel_of_a_pdl_file_waits_first(file):
    """Each kernel (or the helper it calls first) calls forge_wait_prior_grid() before any return, barrier,
    load or store through its pointer arguments (index math and weight prefetches may come first): a kernel
    that returned without waiting could complete before the kernel it follows, and the next one's wait
    would not cover that one."""
    source = (compiler.KERNEL_DIR / file).read_text()
    if file == "paged_attention.cu":
        source += (compiler.KERNEL_DIR / "paged_attention_combine.cuh").read_text()
    helpers = functions(source, "__device__")
    kernels = functions(source, "__global__")
    assert kernels
    for name, (params, body) in kernels.items():
        found = prologue(body, params, helpers)
        assert found is not None and "forge_allow_dependents();" in source, name
        code = re.sub(r"//[^\n]*", "", found[0])
        pointers = re.findall(r"\*\s*(?:__restrict__\s*)?(\w+)\s*(?=[,)]|$)", found[1].replace("\n", " ") + ")")
        forbidden = [r"\breturn\b", r"__syncthreads", r"\bload_\w*\(", r"__ldg", r"\batomic\w*\(", r"cp_async",
                     *(rf"\b{p}\s*\[" for p in pointers)]
        for pattern in forbidden:
            assert not re.search(pattern, code), (name, pattern, code)


def nvrtc_ptx(file: str, arch: str, **defines) -> str:
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
    try:
        include = compiler.cuda_include_dirs()
    except RuntimeError:
        pytest.skip("no CUDA headers")
    source = (compiler.KERNEL_DIR / file).read_bytes()
    err, prog = nvrtc.nvrtcCreateProgram(source, file.encode(), 0, [], [])
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        pytest.skip(f"NVRTC unavailable: {err}")
    opts = [f"--gpu-architecture={arch.replace('sm_', 'compute_')}", "-std=c++17", f"-I{compiler.KERNEL_DIR}",
            *(f"-I{d}" for d in include), *(f"-D{k}={v}" for k, v in defines.items())]
    (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
    assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * size
    nvrtc.nvrtcGetPTX(prog, ptx)
    return ptx.decode()


@pytest.mark.parametrize("file,defines", [("norm.cu", dict(FORGE_DTYPE=1, VEC=8)),
                                          ("activation.cu", dict(FORGE_DTYPE=1, VEC=8)),
                                          ("quant_gemm.cu", dict(FORGE_DTYPE=1, WCODE=0, GROUP=128)),
                                          ("quant_gemm.cu", dict(FORGE_DTYPE=1, WCODE=2, GROUP=0, NORM_PROLOGUE=1))])
def test_forge_pdl_compiles_the_wait_on_sm90_only(file, defines):
    with_pdl = nvrtc_ptx(file, "sm_90", FORGE_PDL=1, **defines)
    kernels = with_pdl.count(".entry")
    assert with_pdl.count("griddepcontrol.wait") == kernels
    assert with_pdl.count("griddepcontrol.launch_dependents") == kernels
    assert "griddepcontrol" not in nvrtc_ptx(file, "sm_90", **defines)
    assert "griddepcontrol" not in nvrtc_ptx(file, "sm_80", FORGE_PDL=1, **defines)


# A PDL build must not read another kernel's output through the non-coherent path: ld.global.nc is outside the
# PTX memory model that griddepcontrol.wait orders, and const __restrict__ loads (which become ld.global.nc) may
# also move above the wait. Explicit streaming loads of weights (ld.global.nc.L1::no_allocate) and the decode
# kernel's block-table reads (__ldg; written by copies before the step) are the only nc loads left.
NC_ALLOWED = {"paged_attention.cu": "ld.global.nc.s32"}  # the __ldg of a block-table entry


@pytest.mark.parametrize("file,defines", [
    ("norm.cu", dict(FORGE_DTYPE=1, VEC=8)), ("norm.cu", dict(FORGE_DTYPE=0, VEC=4, FORGE_WDTYPE=0)),
    ("activation.cu", dict(FORGE_DTYPE=1, VEC=8)), ("rope_cache.cu", dict(FORGE_DTYPE=1, VEC=8, FORGE_CACHE_DTYPE=1)),
    ("paged_attention.cu", None),  # (its kernel_config's defines for D = 128, group 4)
    ("sampling.cu", {}), ("token_bitmask.cu", {}),
    ("moe.cu", dict(FORGE_DTYPE=1, VEC=8, WARPS=4, ROWS=4, MAX_PAIRS=8, PER_LANE=4)),
    ("quant_gemm.cu", dict(FORGE_DTYPE=1, WCODE=2, GROUP=0, NORM_PROLOGUE=1, ACT=1, RT=2)),
    ("quant_gemm.cu", dict(FORGE_DTYPE=1, WCODE=0, GROUP=128)),
    ("quant_gemm.cu", dict(FORGE_DTYPE=1, WCODE=1, GROUP=0, NORM_PROLOGUE=1)),
])
def test_pdl_builds_read_activations_coherently(file, defines):
    if defines is None:
        from forge.kernels import paged_attention

        defines = dict(FORGE_DTYPE=1, FORGE_CACHE_DTYPE=1, BLOCK_SIZE=16,
                       **paged_attention.kernel_config(128, 4, torch.bfloat16))
    def nc_loads(ptx: str) -> list[str]:
        return [line.strip() for line in ptx.splitlines() if re.search(r"ld\.global\.nc(?!\.L1::no_allocate)", line)
                and not (file in NC_ALLOWED and NC_ALLOWED[file] in line)]

    assert nc_loads(nvrtc_ptx(file, "sm_90", FORGE_PDL=1, **defines)) == []
    assert nc_loads(nvrtc_ptx(file, "sm_90", **defines))  # (without PDL, const __restrict__ gives nc loads)


# ---- benchmarks/decode.py --pdl ------------------------------------------------------------------------

def test_decode_benchmark_pdl_flag_and_ratios():
    from benchmarks import decode

    assert decode.parse_args([]).pdl == [None]
    assert decode.parse_args(["--pdl", "off", "on", "off"]).pdl == ["off", "on"]
    rows = [{"shape": "s", "batch": 1, "pdl": "off", "tok": 100.0}, {"shape": "s", "batch": 1, "pdl": "on", "tok": 125.0},
            {"shape": "s", "batch": 8, "pdl": "on", "tok": 50.0}]
    decode.add_pdl_ratios(rows, ("shape", "batch"), "tok")
    assert [r["decode_ratio_vs_pdl_off"] for r in rows] == [1.0, 1.25, None]


def test_decode_quant_rows_keep_pdl_apart():
    from benchmarks import decode

    res = {("bf16", "auto"): ({1: {"tok_s": 10.0, "decode_tok_s": 12.0}}, 2e9, {})}
    on = decode.quant_rows("s", res, 4e12, [1], pdl="on")
    off = decode.quant_rows("s", res, 4e12, [1], pdl="off")
    assert on[0]["pdl"] == "on" and off[0]["pdl"] == "off"
    # earlier rows: PDL off, one from before the flag (no "pdl": off), and PDL on (measured again now)
    old = [off[0], {k: v for k, v in off[0].items() if k != "pdl"}, {**on[0], "tok_s": 1.0}]
    assert decode.merge_rows(old, on) == [old[0], old[1], on[0]]
