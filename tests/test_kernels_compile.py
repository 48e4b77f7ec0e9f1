"""Every registry kernel, in every shipped config, lowers and compiles for sm_90a (no GPU needed)."""

import re

import pytest

from tilev4.kernels import DEFAULT_AOT_ARCH, compile_kernel, get_kernel_def, iter_registry
from tilev4.kernels.moe import DOWN_192_CONFIG, UP_192_CONFIG
from tilev4.kernels.registry import canonical_config

CASES = [(k.name, dict(c)) for k in iter_registry() for c in k.configs]

_DYN_SHARED = re.compile(r"void\* (\w+) = \(\(void\*\)\(\(char\*\)buf_dyn_shmem \+ (\d+)\)\);")
_WGMMA_DESCRIPTOR = re.compile(r"initialize_wgmma_descriptor<(\d+), \d+, \d+>\(\w+, ([^;]*)\);")
_SWIZZLE_ALIGNMENT = {0: 16, 1: 1024, 2: 512, 3: 256}  # the descriptor's layout type: none, 128, 64, 32-byte swizzle


def wgmma_operands(src: str) -> list[tuple[str, int, int]]:
    """``(buffer, offset, alignment)`` of every wgmma shared-memory operand of the CUDA source ``src`` that lives in
    the merged dynamic shared memory: its start in it and the boundary its descriptor's swizzle needs (TileLang writes
    the descriptor with base offset 0, so an operand off that boundary reads other elements than were stored there:
    no error, wrong data)."""
    offsets = {name: int(off) for name, off in _DYN_SHARED.findall(src)}
    return [(name, offsets[name], _SWIZZLE_ALIGNMENT[int(mode)])
            for mode, arg in _WGMMA_DESCRIPTOR.findall(src) for name in re.findall(r"\w+", arg) if name in offsets]


def assert_wgmma_operands_aligned(src: str) -> None:
    """Every wgmma operand on its swizzle's boundary, and no dynamic shared buffer left unnamed: buffers allocated in a
    comprehension all come out as ``v``, ``v_1``, … and TileLang 0.1.15 keys recorded alignments by name (see
    :func:`tilev4.kernels.moe_ws.shared_buffers`), so such a program is aligned by luck of the allocation order."""
    unnamed = [name for name, _ in _DYN_SHARED.findall(src) if re.fullmatch(r"v(_\d+)?", name)]
    assert not unnamed, f"unnamed dynamic shared buffers {unnamed}: allocate lists with moe_ws.shared_buffers"
    operands = wgmma_operands(src)
    if "initialize_wgmma_descriptor" in src:
        assert operands, "no wgmma operand found: the pattern no longer matches TileLang's CUDA"
    bad = sorted({op for op in operands if op[1] % op[2]})
    assert not bad, f"wgmma operands off their swizzle's boundary (buffer, offset, alignment): {bad}"


def test_wgmma_operand_check_flags_a_misaligned_operand():
    """The check above on a made-up source: a 128-byte-swizzled operand at 25344 (the FP4 swap program's layout when
    its buffers shared one name) fails, the same at 25600 passes, and fails again under an unnamed buffer's name."""
    src = ("  void* b_s0 = ((void*)((char*)buf_dyn_shmem + {off}));\n"
           "  tl::initialize_wgmma_descriptor<1, 1, 64>(desc_a, (&(((fp8_e4_t*)b_s0)[0])));\n")
    assert wgmma_operands(src.format(off=25344)) == [("b_s0", 25344, 1024)]
    with pytest.raises(AssertionError, match="b_s0"):
        assert_wgmma_operands_aligned(src.format(off=25344))
    assert_wgmma_operands_aligned(src.format(off=25600))
    with pytest.raises(AssertionError, match="unnamed"):  # the same operand as TileLang names a comprehension's buffer
        assert_wgmma_operands_aligned(src.format(off=25600).replace("b_s0", "v_2"))


@pytest.mark.compile
@pytest.mark.parametrize(("name", "config"), CASES, ids=[f"{n}-{'-'.join(map(str, c.values()))}" for n, c in CASES])
def test_compiles_for_sm90a(name, config):
    kernel = compile_kernel(name, config, DEFAULT_AOT_ARCH)
    src = kernel.get_kernel_source()
    assert "__global__" in src
    assert kernel.target is not None and "sm_90a" in str(kernel.target)
    assert_wgmma_operands_aligned(src)


def test_registry_is_complete_and_documented():
    names = [k.name for k in iter_registry()]
    assert {"rmsnorm", "fp8_quantize"} <= set(names)
    for k in iter_registry():
        assert k.summary, f"{k.name}: the factory needs a docstring"
        assert k.configs, f"{k.name}: no default config"


def test_config_key_is_canonical():
    kdef = get_kernel_def("rmsnorm")
    assert canonical_config(kdef, {"D": 4096}) == canonical_config(kdef, {"D": 4096, "eps": 1e-6})
    with pytest.raises(ValueError, match="unknown config keys"):
        canonical_config(kdef, {"D": 4096, "tile": 3})
    with pytest.raises(ValueError, match="unknown kernel"):
        get_kernel_def("no_such_kernel")


WS_PROGRAMS = [
    ("csa_attention", {"heads": 64, "kind": "main", "schedule": "ws"}),
    ("csa_attention", {"heads": 64, "kind": "main", "schedule": "seesaw"}),
    ("csa_attention", {"heads": 64, "kind": "main", "ring": True, "schedule": "seesaw", "block_kv": 32,
                       "pair_stages": 2}),
    ("moe_up", {"dim": 4096, "schedule": "ws"}),
    ("moe_down", {"inter": 2048, "dense": True, "schedule": "ws"}),
]


@pytest.mark.compile
@pytest.mark.parametrize("kind", ["up", "down"])
def test_192_row_tile_fits_registers_and_shared_memory(kind):
    """The bf16 expert GEMMs' 192-row tile (three consumer warpgroups and the producer: 512 threads, 128 registers
    each at launch) redistributes no more registers than the launch gave, and its 4 stages fit in shared memory
    because the consumers stage their output in their A slabs (no staging tiles); the down-projection's 256-column
    tile is two 128-column weight tiles."""
    from tilev4.kernels.moe_ws import ws_buffer_bytes

    config = {"dim": 4096, **UP_192_CONFIG} if kind == "up" else {"inter": 2048, **DOWN_192_CONFIG}
    kernel = compile_kernel(f"moe_{kind}", config, DEFAULT_AOT_ARCH)
    src = kernel.get_kernel_source()
    counts = [int(n) for n in re.findall(r"warpgroup_reg_(?:alloc|dealloc)<(\d+)>", src)]
    assert len(counts) == 4 and sum(counts) <= 4 * 128, counts
    smem = sum(ws_buffer_bytes(2, kind == "up", 128, 64, config["num_stages"], block_m=192))
    assert smem <= 227 * 1024, smem
    assert "tma_store" in src  # the staged output leaves by TMA
    assert_wgmma_operands_aligned(src)


@pytest.mark.compile
@pytest.mark.parametrize(("name", "config"), WS_PROGRAMS,
                         ids=[f"{n}-{c['schedule']}" + ("-ring" if c.get("pair_stages", 1) > 1 else "")
                              for n, c in WS_PROGRAMS])
def test_warp_specialised_register_split_fits_the_launch_allocation(name, config):
    """The warpgroups' setmaxnreg counts must fit in what the CTA gets at launch (384 threads: at most 168
    registers each); a larger sum makes ``setmaxnreg.inc`` wait forever for registers nobody frees."""
    kernel = compile_kernel(name, config, DEFAULT_AOT_ARCH)
    src = kernel.get_kernel_source()
    counts = [int(n) for n in re.findall(r"warpgroup_reg_(?:alloc|dealloc)<(\d+)>", src)]
    assert len(counts) == 3, counts
    assert sum(counts) <= 3 * 168, counts


SEESAW_PROGRAMS = [
    ("csa_attention", {"heads": 64, "kind": "main", "schedule": "seesaw"}),
    ("csa_attention", {"heads": 64, "kind": "main", "schedule": "seesaw", "query_tiles": 2}),
    ("hca_attention", {"heads": 64, "kind": "split", "schedule": "seesaw"}),
]


@pytest.mark.compile
@pytest.mark.parametrize(("name", "config"), SEESAW_PROGRAMS,
                         ids=[f"{n}-{c['kind']}-qt{c.get('query_tiles', 1)}" for n, c in SEESAW_PROGRAMS])
def test_seesaw_program_syncs_only_its_staged_output(name, config):
    """The seesaw program turns TileLang's automatic shared-memory syncs off (mbarriers order every hand-over between
    warpgroups): its only warpgroup barriers are the explicit ones around the staged output (ids 8 and 9, one per
    consumer), before each TMA store of the output. Walking several queries, a consumer's four chunks alternate
    between two slots: a chunk is staged once the store two chunks back has read its slot (one store group left in
    flight), and all stores have read their slots when the query ends."""
    src = compile_kernel(name, config, DEFAULT_AOT_ARCH).get_kernel_source()
    syncs = re.findall(r"__sync_thread_partial\((\d+), (\d+)\)", src)
    assert {int(i) for i, _ in syncs} <= {8, 9}, syncs
    assert {int(n) for _, n in syncs} <= {128}, syncs
    stores = len(re.findall(r"tl::tma_store\(o_desc", src))
    if config["kind"] == "split":
        assert stores == 0 and not syncs  # the split program writes its fp32 partials straight from registers
    elif config.get("query_tiles", 1) == 1:
        assert stores == 2 and sorted(i for i, _ in syncs) == ["8", "9"]  # one store a consumer, a sync before it
    else:
        # a consumer: a sync after staging each of its 4 chunks, one after the waits before chunks 2 and 3, one at
        # the end
        assert stores == 8 and len(syncs) == 14
        assert len(re.findall(r"tl::tma_store_wait<1, true>", src)) == 4
        assert len(re.findall(r"tl::tma_store_wait<0, true>", src)) == 2


@pytest.mark.compile
@pytest.mark.parametrize(("name", "problem", "kind"), [("moe_up_fp4", {"dim": 4096}, "up"),
                                                       ("moe_down_fp4", {"inter": 2048}, "down")])
def test_fp4_swap_schedule_builds_for_its_ctas_an_sm(name, problem, kind):
    """The FP4 swap schedule the ops take at decode (not a shipped config: the ops add its keys by the rows, see
    ``swap_config``) compiles for sm_90a with launch bounds of ``swap_ctas`` CTAs an SM (two for the up-projection's
    two expanded sources, three for the down-projection), and its shared memory fits them: every buffer starts
    below the size ``swap_ctas`` counts, which leaves room for that many CTAs in the SM's 228 KB."""
    from tilev4.kernels.moe_fp4 import SWAP_BLOCK_N, SWAP_CONFIG, _swap_shared_bytes, swap_ctas

    stages = SWAP_CONFIG[kind]["packed_stages"]
    ctas = swap_ctas(kind, stages)
    assert ctas == {"up": 2, "down": 3}[kind]
    kernel = compile_kernel(name, {**problem, "block_m": 128, **SWAP_CONFIG[kind]}, DEFAULT_AOT_ARCH)
    src = kernel.get_kernel_source()
    assert f"__launch_bounds__(256, {ctas})" in src
    offsets = [int(n) for n in re.findall(r"buf_dyn_shmem \+ (\d+)\)", src)]
    assert offsets and max(offsets) < _swap_shared_bytes(kind, stages), max(offsets)
    assert ctas * (_swap_shared_bytes(kind, stages) + 2048) <= 232448
    assert "wgmma_ss" in src and ", 64, 8, 32," in src  # m64 n8 k32: the weights as M, the rows as N
    assert f"(N + {SWAP_BLOCK_N - 1}) >> 7)" in src  # the N tiles of 128 weight rows a CTA
    assert_wgmma_operands_aligned(src)  # its expanded weight tiles sit on 1024-byte boundaries


def test_fp4_swap_ctas_follow_shared_memory():
    """Three CTAs an SM where their shared memory fits, fewer where a deeper packed ring or two sources take more."""
    from tilev4.kernels.moe_fp4 import _swap_shared_bytes, swap_ctas

    assert swap_ctas("down", 4) == 3 and swap_ctas("up", 2) == 2 and swap_ctas("up", 4) == 1
    assert _swap_shared_bytes("up", 2) > _swap_shared_bytes("down", 2)
    for kind in ("up", "down"):
        for stages in (1, 2, 3, 4, 6, 8):
            ctas = swap_ctas(kind, stages)
            assert ctas * (_swap_shared_bytes(kind, stages) + 2048) <= 232448 or ctas == 1


MASKED_STORE_PROGRAMS = [
    ("moe_up", {"dim": 4096, "schedule": "ws"}, "uint4", "h"),
    ("moe_down", {"inter": 2048, "schedule": "ws"}, "uint4", "y"),
    ("moe_up", {"dim": 4096, **UP_192_CONFIG}, "uint4", "h"),
    ("moe_down", {"inter": 2048, **DOWN_192_CONFIG}, "uint4", "y"),
    ("moe_up_fp8_q", {"dim": 4096}, "fp8_e4_16_t", "h8"),
    ("moe_down_fp8", {"inter": 2048, "schedule": "ws"}, "uint4", "y"),
    ("moe_up_fp4", {"dim": 4096, "schedule": "ws"}, "uint4", "h"),
    ("moe_down_fp4", {"inter": 2048, "schedule": "ws"}, "uint4", "y"),
]


@pytest.mark.compile
@pytest.mark.parametrize(("name", "config", "vec", "out"), MASKED_STORE_PROGRAMS,
                         ids=[n + ("-192" if c.get("block_m") == 192 else "") for n, c, *_ in MASKED_STORE_PROGRAMS])
def test_ws_expert_gemm_masked_rows_store_16_bytes(name, config, vec, out):
    """A consumer whose 64-row slab is partly another expert's stores its valid rows with 16-byte stores
    (``moe_ws.masked_rows``; element by element they cost ~5 % of the down-projections on a skewed routing), and a
    full slab leaves by TMA: the vectoriser must keep finding the 16-byte plan (it needs ``N`` and the first column
    to be multiples of a vector), or these stores fall back to one element at a time without an error."""
    src = compile_kernel(name, config, DEFAULT_AOT_ARCH).get_kernel_source()
    assert f"*({vec}*)({out} + " in src
    assert "tl::tma_store(" in src


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80", "sm_89", "sm_100a", "sm_120f"])
def test_check_arch_accepts_sm_archs(arch):
    from tilev4.kernels.registry import check_arch

    assert check_arch(arch) == arch


@pytest.mark.parametrize("arch", ["sm_9x", "90a", "sm_90A", "", None, "sm_0", "compute_90", "sm_90a "])
def test_malformed_arch_is_a_value_error(arch, monkeypatch):
    from tilev4.kernels.registry import check_arch, current_arch

    with pytest.raises(ValueError, match=r"arch must be a CUDA SM arch such as 'sm_90a'.*got " + re.escape(repr(arch))):
        check_arch(arch)
    if isinstance(arch, str) and arch:
        with pytest.raises(ValueError, match=re.escape(repr(arch))):
            compile_kernel("rmsnorm", arch=arch)  # before any lowering
        monkeypatch.setenv("TILEV4_ARCH", arch)
        with pytest.raises(ValueError, match=r"\$TILEV4_ARCH must be a CUDA SM arch"):
            current_arch()


def test_a_hopper_kernel_for_another_arch_is_a_clear_value_error(tmp_path, monkeypatch):
    """Most kernels need Hopper's TMA and wgmma: built for sm_80 they fail with a ValueError that names the kernel,
    the arch and the one they are written for (TileLang's own error kept as the cause); a kernel that lowers for
    sm_80 still builds there."""
    monkeypatch.setenv("TILEV4_CACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"kernel 'csa_attention' could not be built for arch 'sm_80': tilev4's "
                                         r"kernels are written for sm_90a .*\(InternalError: .*TMA") as err:
        compile_kernel("csa_attention", arch="sm_80")
    assert err.value.__cause__ is not None
    assert compile_kernel("rmsnorm", arch="sm_80") is not None
