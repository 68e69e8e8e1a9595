"""Issue 13: the built float32 kernel of the CPU experts (llada_moe_hf/cpu_kernel_llada_moe.py): its products
against torch's, and its loader (cache, switch, no compiler, a failing build)."""

import logging
import os

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


def test_grouped_linear_checks_its_offsets(kernel):
    with pytest.raises(AssertionError):
        kernel_lib.grouped_linear(kernel, torch.randn(4, 8), torch.randn(2, 3, 8), torch.tensor([0, 4]), 0, 4, 9,
                                  torch.empty(4, 3))  # fmt: skip


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
