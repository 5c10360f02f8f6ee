"""Every Triton kernel, compiled for real GPUs on this CPU machine: no register spills, shared
memory within the device's limit.

Each kernel module lists every configuration its launcher can pick (``launch_configs()``); they
are compiled for sm_80 (A100) and sm_90a (H100/H200) by Triton, assembled by the ``ptxas`` that
ships with Triton, and ``ptxas -v`` is read. The first fused-loss kernels spilled 1.4-3.4 KB per
thread at 255 registers, a GPU-speed defect that shows up here without a GPU.
"""

import importlib

import pytest

from mtbi_kernels.compile_check import SHARED_LIMIT, parse_ptxas, ptxas_path, ptxas_reports

MODULES = ("fused_linear_kl", "pack")

pytestmark = pytest.mark.skipif(ptxas_path() is None, reason="ptxas not found (Triton's NVIDIA "
                                "backend ships it; install triton on Linux x86-64)")


def all_configs():
    configs = []
    for name in MODULES:
        configs += importlib.import_module(f"mtbi_kernels.{name}").launch_configs()
    return configs


@pytest.fixture(scope="module", params=[80, 90], ids=["sm_80", "sm_90a"])
def compiled(request):
    configs = all_configs()
    return request.param, list(zip(configs, ptxas_reports(configs, request.param)))


def test_every_kernel_module_lists_its_configs():
    configs = all_configs()
    kernels = {c.kernel for c in configs}
    assert kernels == {"mtbi_kernels.fused_linear_kl:_kl_rows_kernel",
                       "mtbi_kernels.pack:_pack_kernel", "mtbi_kernels.pack:_unpack_grad_kernel"}
    assert len({c.name for c in configs}) == len(configs)


def test_no_register_spills(compiled):
    arch, reports = compiled
    spilling = [f"{cfg.name}: {r['registers']} registers, {r['spill_stores']} B spill stores, "
                f"{r['spill_loads']} B spill loads" for cfg, r in reports
                if r["spill_stores"] or r["spill_loads"] or r["stack"]]
    assert not spilling, f"sm_{arch}:\n" + "\n".join(spilling)
    assert all(0 < r["registers"] <= 255 for _, r in reports)


def test_shared_memory_within_device_limit(compiled):
    arch, reports = compiled
    over = [f"{cfg.name}: {r['shared']} B" for cfg, r in reports if r["shared"] > SHARED_LIMIT[arch]]
    assert not over, f"sm_{arch} allows {SHARED_LIMIT[arch]} B:\n" + "\n".join(over)


def test_parse_ptxas_reads_spills():
    text = ("ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
            "ptxas info    : Function properties for _k\n"
            "    1224 bytes stack frame, 1452 bytes spill stores, 2020 bytes spill loads\n"
            "ptxas info    : Used 255 registers, used 1 barriers, 1224 bytes cumulative stack size\n")
    assert parse_ptxas(text) == dict(registers=255, spill_stores=1452, spill_loads=2020, stack=1224)
    with pytest.raises(ValueError, match="no register report"):
        parse_ptxas("ptxas fatal   : something went wrong")


def test_a_spilling_kernel_is_caught():
    """The check itself: the row kernel at a 2048-column tile on a single warp (64 live values per
    thread in each running array, fp32 with CE) needs more than 255 registers on sm_90a, and must be
    reported as spilling."""
    from mtbi_kernels.fused_linear_kl import launch_configs

    cfg = next(c for c in launch_configs() if "fp32" in c.name and "ce=True" in c.name)
    wide = type(cfg)(name="wide tile, one warp", kernel=cfg.kernel, signature=cfg.signature,
                     constexprs={**cfg.constexprs, "BLOCK_V": 2048}, num_warps=1)
    (report,) = ptxas_reports([wide], 90)
    assert report["registers"] == 255 and report["spill_stores"] > 0
