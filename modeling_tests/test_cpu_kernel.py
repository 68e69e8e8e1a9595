"""Issue 13: the built float32 kernel of the CPU experts (llada_moe_hf/cpu_kernel_llada_moe.py): its products
against torch's, and its loader (cache, switch, no compiler, a failing build)."""

import logging
import os
import platform
import subprocess

import pytest
import torch

from llada_moe_hf import cpu_kernel_llada_moe as kernel_lib


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A fresh loader state and cache folder for this test, the session's kernel restored after it."""
    saved = dict(kernel_lib._state)
    kernel_lib.reset()
    monkeypatch.setenv(kernel_lib.ENV_CACHE, str(tmp_path / "kernels"))
    monkeypatch.delenv(kernel_lib.ENV_SWITCH, raising=False)
    yield tmp_path / "kernels"
    kernel_lib._state.clear()
    kernel_lib._state.update(saved)


@pytest.fixture(scope="module")
def kernel():
    built = kernel_lib.load()
    if built is None:
        if os.environ.get("LLADA_MOE_REQUIRE_KERNEL") == "1":  # CI has a compiler: a skip would hide a break
            pytest.fail("the CPU experts kernel did not build (see the warning above)")
        pytest.skip("no C++ compiler here: the CPU experts kernel cannot be built")
    return built


# Row counts through each form: the dot products (1-4), each width of the outer products (1-4 vectors, a
# partial vector), several chunks of 64 rows; K and N neither multiples of 16 nor of the tile sizes.
ROWS = [1, 2, 3, 4, 5, 15, 16, 17, 31, 33, 48, 63, 64, 65, 100, 130]


def kernel_dtype(kernel, name):
    dtype = getattr(torch, name)
    if dtype not in kernel.dtypes:
        pytest.skip(f"this CPU has no {name} kernel (bfloat16 needs AVX512_BF16)")
    return dtype


def reference(x, weight, dtype):
    """torch's product; in bfloat16 the float32 product of the same bfloat16 values, rounded once."""
    return (x.float() @ weight.float().t()).to(dtype)


def tolerances(dtype):
    return dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n, k", [(40, 96), (97, 40), (53, 7), (512, 512)])
def test_rows_linear_equals_torch(kernel, dtype, rows, n, k):
    dtype = kernel_dtype(kernel, dtype)
    generator = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k + 3, generator=generator).to(dtype)[:, 2 : 2 + k]  # rows strided wider than K
    weight = torch.randn(n, k, generator=generator).to(dtype)
    out = torch.full((rows, n + 5), float("nan"), dtype=dtype)[:, :n]
    assert kernel_lib.usable(kernel, x, weight, out)
    kernel_lib.rows_linear(kernel, x, weight, out)
    torch.testing.assert_close(out, reference(x, weight, dtype), **tolerances(dtype))


def test_usable_refuses_what_the_kernel_cannot_read(kernel):
    x, weight, out = torch.randn(4, 8), torch.randn(6, 8), torch.empty(4, 6)
    assert kernel_lib.usable(kernel, x, weight, out)
    assert not kernel_lib.usable(kernel, x.double(), weight.double(), out.double())
    assert not kernel_lib.usable(kernel, x.half(), weight.half(), out.half())
    assert not kernel_lib.usable(kernel, x, weight.bfloat16(), out)  # mixed dtypes
    assert not kernel_lib.usable(kernel, x.t().contiguous().t(), weight, out)  # columns contiguous, not rows
    assert not kernel_lib.usable(kernel, x, weight.t().contiguous().t(), out)
    assert not kernel_lib.usable(kernel, x, weight, torch.empty(4, 7))
    assert not kernel_lib.usable(kernel, x, torch.randn(6, 9), out)
    assert not kernel_lib.usable(kernel, x.to("meta"), weight.to("meta"), out.to("meta"))


def test_bfloat16_rounds_once_to_nearest_even(kernel):
    """Each output is its float32 sum rounded to bfloat16 once: exactly torch's rounding of that sum."""
    dtype = kernel_dtype(kernel, "bfloat16")
    x = torch.tensor([[1.0, 2.0**-8, 2.0**-9]]).to(dtype).repeat(20, 1)  # 20 rows: the outer form
    weight = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 1.0]]).to(dtype)
    for rows in (1, 20):
        out = torch.empty(rows, 3, dtype=dtype)
        kernel_lib.rows_linear(kernel, x[:rows], weight, out)
        assert torch.equal(out, reference(x[:rows], weight, dtype).expand(rows, 3))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("row_start, row_end", [(0, 70), (0, 23), (23, 70), (5, 6), (30, 30)])
def test_grouped_linear_runs_each_expert_in_the_range(kernel, dtype, row_start, row_end):
    """Experts of 0 (idle), 3, 20, 1 and 46 rows; a range that cuts experts; max_rows leaves the 46 alone."""
    dtype = kernel_dtype(kernel, dtype)
    counts = [0, 3, 20, 1, 46]
    offsets = torch.tensor([0] + counts).cumsum(0)
    x = torch.randn(70, 40).to(dtype)
    weights = torch.randn(5, 24, 40).to(dtype)
    out = torch.full((70, 24), float("nan"), dtype=dtype)
    assert kernel_lib.grouped_usable(kernel, x, weights, out)
    kernel_lib.grouped_linear(kernel, x, weights, offsets, row_start, row_end, 45, out)
    for expert in range(5):
        lo, hi = max(offsets[expert].item(), row_start), min(offsets[expert + 1].item(), row_end)
        if hi <= lo:
            continue
        if hi - lo > 45:  # left to the caller
            assert out[lo:hi].isnan().all()
        else:
            torch.testing.assert_close(out[lo:hi], reference(x[lo:hi], weights[expert], dtype), **tolerances(dtype))
    outside = torch.ones(70, dtype=torch.bool)
    outside[row_start:row_end] = False
    assert out[outside].isnan().all()  # rows outside the range untouched


def test_grouped_linear_checks_its_offsets_and_rows(kernel):
    x, weights, out = torch.randn(4, 8), torch.randn(2, 3, 8), torch.empty(4, 3)
    with pytest.raises(ValueError, match="3 entries"):
        kernel_lib.grouped_linear(kernel, x, weights, torch.tensor([0, 4]), 0, 4, 9, out)
    with pytest.raises(ValueError, match="3 entries"):
        kernel_lib.grouped_linear(kernel, x, weights, torch.tensor([0, 2, 4], dtype=torch.int32), 0, 4, 9, out)
    with pytest.raises(ValueError, match="within the 4 rows"):
        kernel_lib.grouped_linear(kernel, x, weights, torch.tensor([0, 2, 4]), 0, 5, 9, out)
    with pytest.raises(ValueError, match="within the 4 rows"):
        kernel_lib.grouped_linear(kernel, x, weights, torch.tensor([0, 2, 6]), 0, 4, 9, out)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bounds", [[0, 23, 70], [0, 10, 12, 50, 70], [5, 5, 30], [0, 70]])
def test_grouped_linear_lanes_equal_one_range_per_lane(kernel, dtype, bounds, two_threads):
    """The lanes at once give each lane's grouped_linear, bit for bit; each lane on the OpenMP thread of its
    number (modulo the team), so that two lanes really run on two threads."""
    dtype = kernel_dtype(kernel, dtype)
    counts = [0, 3, 20, 1, 46]
    offsets = torch.tensor([0] + counts).cumsum(0)
    x = torch.randn(70, 40).to(dtype)
    weights = torch.randn(5, 24, 40).to(dtype)
    want = torch.full((70, 24), float("nan"), dtype=dtype)
    for lo, hi in zip(bounds, bounds[1:]):
        kernel_lib.grouped_linear(kernel, x, weights, offsets, lo, hi, 45, want)
    got = torch.full((70, 24), float("nan"), dtype=dtype)
    lanes = len(bounds) - 1
    lane_thread = torch.full((lanes,), -1, dtype=torch.int64)
    kernel_lib.grouped_linear_lanes(kernel, x, weights, offsets, bounds, 45, got, lane_thread)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    threads = 2 if kernel.parallel and lanes > 1 else 1  # one lane runs on the calling thread
    assert lane_thread.tolist() == [lane % threads for lane in range(lanes)]


def test_grouped_linear_lanes_checks_its_bounds(kernel):
    x, weights, out = torch.randn(4, 8), torch.randn(2, 3, 8), torch.empty(4, 3)
    offsets = torch.tensor([0, 2, 4])
    with pytest.raises(ValueError, match="nondecreasing"):
        kernel_lib.grouped_linear_lanes(kernel, x, weights, offsets, [0, 3, 2], 9, out)
    with pytest.raises(ValueError, match="nondecreasing"):
        kernel_lib.grouped_linear_lanes(kernel, x, weights, offsets, [4], 9, out)
    with pytest.raises(ValueError, match="within the 4 rows"):
        kernel_lib.grouped_linear_lanes(kernel, x, weights, offsets, [0, 2, 5], 9, out)
    with pytest.raises(ValueError, match="2 entries"):
        kernel_lib.grouped_linear_lanes(kernel, x, weights, offsets, [0, 2, 4], 9, out, torch.zeros(3).long())


def test_the_lanes_find_torchs_openmp_runtime(kernel):
    """On Linux torch runs its parallel regions on an OpenMP runtime the kernel finds (torch's own copy first)."""
    if platform.system() != "Linux" or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch here has no OpenMP runtime to find")
    openmp = kernel_lib.find_openmp()
    assert openmp is not None and kernel.parallel
    assert openmp.omp_get_num_threads() == 1  # outside a parallel region


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_empty_sum_is_zero(kernel, dtype):
    dtype = kernel_dtype(kernel, dtype)
    for rows in (3, 20):  # both forms
        out = torch.full((rows, 5), float("nan"), dtype=dtype)
        kernel_lib.rows_linear(kernel, torch.empty(rows, 0, dtype=dtype), torch.empty(5, 0, dtype=dtype), out)
        assert torch.equal(out, torch.zeros(rows, 5, dtype=dtype))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 targets")
@pytest.mark.parametrize("target", [["-march=x86-64-v3"], []], ids=["avx2", "default"])
def test_narrow_targets_build_and_give_torchs_numbers(isolated, kernel, target):
    """The same source for AVX2 and for the compiler's default x86-64 target (SSE2): smaller register tiles,
    the same products; such a build reports no wide vectors (load() does not use it unless asked)."""
    narrow = kernel_lib.build_and_bind(kernel_lib._compiler(), targets=(target,))
    assert not narrow.wide_vectors and narrow.flags == target and torch.bfloat16 not in narrow.dtypes
    for rows in (1, 4, 5, 17, 33, 49, 70):
        x, weight = torch.randn(rows, 40), torch.randn(37, 40)
        out = torch.empty(rows, 37)
        kernel_lib.rows_linear(narrow, x, weight, out)
        torch.testing.assert_close(out, x @ weight.t(), rtol=1e-5, atol=1e-4)


def test_without_avx512_load_uses_the_kernel_only_when_asked(isolated, kernel, monkeypatch, caplog):
    build = kernel_lib.build_and_bind
    monkeypatch.setattr(kernel_lib, "build_and_bind", lambda compiler: build(compiler, targets=([],)))
    with caplog.at_level(logging.INFO, logger=kernel_lib.__name__):
        assert kernel_lib.load() is None
    assert "no AVX-512" in caplog.text and "LLADA_MOE_CPU_KERNEL=1" in caplog.text
    kernel_lib.reset()
    monkeypatch.setenv(kernel_lib.ENV_SWITCH, "1")
    forced = kernel_lib.load()
    assert forced is not None and not forced.wide_vectors


def test_load_builds_once_then_reuses_the_cache(isolated, kernel):
    first = kernel_lib.load()
    assert first is not None and os.path.dirname(first.path) == str(isolated)
    built = os.path.getmtime(first.path)
    assert sorted(os.listdir(isolated)) == [os.path.basename(first.path)]  # no temporary files left
    kernel_lib.reset()
    second = kernel_lib.load()
    assert second.path == first.path and os.path.getmtime(second.path) == built


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_switched_off_loads_nothing(isolated, monkeypatch, value):
    monkeypatch.setenv(kernel_lib.ENV_SWITCH, value)
    assert kernel_lib.load() is None
    assert not isolated.exists()


def test_no_compiler_says_how_to_get_the_kernel(isolated, monkeypatch, caplog):
    monkeypatch.setattr(kernel_lib, "_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger=kernel_lib.__name__):
        assert kernel_lib.load() is None
        assert kernel_lib.load() is None  # said once
    assert len(caplog.records) == 1
    assert "no C++ compiler found" in caplog.text and "LLADA_MOE_CPU_KERNEL=0" in caplog.text


def test_a_corrupt_cached_library_is_rebuilt(isolated, kernel, caplog):
    """(Written before anything loads it: rewriting a loaded library in place would crash its process, which is
    why builds move a new file in.)"""
    compiler = kernel_lib._compiler()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True).stdout
    path = kernel_lib._library_path(compiler, version, kernel_lib.TARGETS[0])
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"not a library")
    with caplog.at_level(logging.WARNING, logger=kernel_lib.__name__):
        again = kernel_lib.load()
    assert again is not None and again.path == path and "rebuilding it" in caplog.text
    x, weight, out = torch.randn(6, 8), torch.randn(3, 8), torch.empty(6, 3)
    kernel_lib.rows_linear(again, x, weight, out)
    torch.testing.assert_close(out, x @ weight.t())


def test_a_rejected_target_flag_falls_back_to_the_next(isolated, kernel, tmp_path, monkeypatch):
    """A compiler that does not know -march=native (Clang on Arm) gets -mcpu=native, then no target flag; a CXX
    of several words (a wrapper) is split."""
    real = kernel_lib._compiler()[0]
    fake = tmp_path / "picky-c++"
    fake.write_text(
        '#!/bin/sh\nfor a; do case "$a" in -march=*|-mcpu=*) '
        'echo "error: unrecognized command-line option $a" >&2; exit 1;; esac; done\nexec "$@"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", f"{fake} {real}")
    monkeypatch.setenv(kernel_lib.ENV_SWITCH, "1")
    built = kernel_lib.load()
    assert built is not None and built.flags == []
    assert sorted(os.listdir(isolated)) == [os.path.basename(built.path)]


def test_old_leftovers_of_killed_builds_are_removed(isolated, kernel):
    os.makedirs(isolated, exist_ok=True)
    old, new = isolated / "tmpold.cpp", isolated / "tmpnew.so.partial"
    old.write_text("x")
    new.write_text("x")
    os.utime(old, (1, 1))
    kernel_lib.load()
    assert not old.exists() and new.exists()  # a recent one may be another process's build in progress


def test_a_failing_build_falls_back_and_leaves_nothing(isolated, tmp_path, monkeypatch, caplog):
    """A compiler that fails (here: one that writes half a library, then exits 1): a warning with its message,
    no library under the final name, no temporary files."""
    fake = tmp_path / "broken-c++"
    fake.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo "broken 1.0"; exit 0; }\n'
        'for a; do o="$a"; done\necho half > "$o"\necho "error: out of disk" >&2\nexit 1\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with caplog.at_level(logging.WARNING, logger=kernel_lib.__name__):
        assert kernel_lib.load() is None
    assert "could not build the CPU experts kernel" in caplog.text and "out of disk" in caplog.text
    assert os.listdir(isolated) == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_rows_linear_in_parts_gives_one_threads_numbers(kernel, dtype, rows, two_threads):
    """The weight's rows split over the OpenMP team (a dense projection): bit for bit one thread's product."""
    dtype = kernel_dtype(kernel, dtype)
    x, weight = torch.randn(rows, 72).to(dtype), torch.randn(300, 72).to(dtype)
    one, parts = torch.empty(rows, 300, dtype=dtype), torch.full((rows, 300), float("nan"), dtype=dtype)
    kernel_lib.rows_linear(kernel, x, weight, one)
    kernel_lib.rows_linear(kernel, x, weight, parts, threads=2)
    assert torch.equal(one, parts)
    torch.testing.assert_close(parts, reference(x, weight, dtype), **tolerances(dtype))
