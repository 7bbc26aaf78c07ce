"""Launch plans (kernels/_plan.py): grids within CUDA's limits for inputs far beyond these machines, and a
failing plan that falls back alone.

The grid tests run the real Triton launchers on meta tensors (no memory, no data) and intercept the
launch, so they see exactly the grid and arguments production would launch with.
"""

import importlib

import pytest
import torch

import harmonizer_fast as hf
from harmonizer_fast import _backend

kernels = pytest.importorskip("harmonizer_fast.kernels", reason="triton is not installed")
from harmonizer_fast.kernels import _plan, attention_pool, fcomb, film, ged, haar, haar3d  # noqa: E402

INT32_MAX = 2**31 - 1


@pytest.fixture
def launches(monkeypatch):
    seen = []

    def record(self, grid, *args):
        _plan.check_grid(grid, self.name)
        seen.append((self, grid, args))

    monkeypatch.setattr(_plan.LaunchPlan, "launch", record)
    return seen


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


def _within_limits(seen):
    assert seen
    for plan, grid, _ in seen:
        assert all(1 <= g for g in grid), (plan.key, grid)
        assert grid[0] <= _plan.GRID_LIMITS[0] and all(g <= 65535 for g in grid[1:]), (plan.key, grid)


def test_haar_grids_for_a_million_planes_and_2_to_the_32_elements(launches):
    x = _meta(1000, 1000, 8, 8)  # 10^6 planes
    haar.haar_dwt2d_into(x, _meta(1000, 1000, 4, 4), _meta(1000, 1000, 3, 4, 4))
    haar.haar_idwt2d(_meta(1000, 1000, 4, 4), _meta(1000, 1000, 3, 4, 4), 8, 8)
    big = _meta(1, 1, 65536, 65536)  # 2^32 elements in one plane
    haar.haar_dwt2d_into(big, _meta(1, 1, 32768, 32768), _meta(1, 1, 3, 32768, 32768))
    _within_limits(launches)
    assert launches[0][1][0] == 10**6  # the planes are on grid x


def test_haar3d_grids_for_a_million_volumes_and_2_to_the_33_elements(launches):
    x = _meta(1000, 1000, 2, 4, 4)  # 10^6 volumes of one band slab each
    haar3d.haar_dwt3d_into(x, _meta(1000, 1000, 8, 1, 2, 2))
    haar3d.haar_idwt3d(_meta(1000, 1000, 8, 1, 2, 2), 2, 4, 4)
    big = _meta(1, 1, 2048, 2048, 2048)  # 2^33 elements in one volume
    haar3d.haar_dwt3d_into(big, _meta(1, 1, 8, 1024, 1024, 1024))
    haar3d.haar_idwt3d(_meta(1, 1, 8, 1024, 1024, 1024), 2048, 2048, 2048)
    _within_limits(launches)
    assert launches[0][1][0] == 10**6  # the (volume, band-slice) slabs are on grid x


def test_film_grids_for_a_million_planes(launches):
    x = _meta(1000, 1000, 8, 8)
    film.film_forward(x, _meta(1000, 1000), _meta(1000, 1000))
    film.film_backward(x, x, _meta(1000, 1000))
    film.film_forward(_meta(1, 1, 65536, 65536), _meta(1, 1), _meta(1, 1))
    _within_limits(launches)


def test_fcomb_grid_for_images_over_8_million_pixels(launches):
    # grid y used to carry the pixel blocks: cdiv(10^8, 128) = 781,250 > 65,535
    fcomb.fcomb_head(_meta(2, 16, 10**8), _meta(2, 50, 16), _meta(3, 16, 16), _meta(3, 16), _meta(16), _meta(1))
    _within_limits(launches)


def test_attention_pool_grids_for_large_batches_and_maps(launches):
    attention_pool.attention_pool_forward(_meta(70000, 256, 4, 4), _meta(70000, 8, 256))
    attention_pool.attention_pool_forward(_meta(1, 256, 2048, 2048), _meta(1, 8, 256))  # 2^30: the int32 rule's edge
    _within_limits(launches)


def test_ged_grids_for_70000_samples(launches):
    s, r = _meta(1, 70000, 64), _meta(1, 4, 64)
    ged.ged_sums(s, r, 0.5, 1e-7, 1.0, True)
    ged.pairwise_overlap(s, r, 0.5, False, 1e-7, 1.0, ged.MODE_IOU)
    _within_limits(launches)


def test_attention_pool_leaves_items_beyond_int32_offsets_to_other_backends():
    """The attention kernels address one batch item in int32 (their plans declare C, N and sxc bounded for the
    compile check's int32 rule): the rule that keeps that true, and the routing it drives."""
    import importlib

    ops_ap = importlib.import_module("harmonizer_fast.ops.attention_pool")
    small, big = _meta(2, 64, 512, 512), _meta(1, 64, 8192, 4096)  # 2^24 and 2^31 elements per item
    assert attention_pool.fits(small, 8) and not attention_pool.fits(big, 8)
    wide = torch.empty_strided((1, 2, 4, 4), (2**31, 2**30, 4, 1), device="meta")  # a strided channel step
    assert not attention_pool.fits(wide, 8)
    if not _backend._unavailable("triton", "cpu"):  # the rule applies where Triton is a candidate
        op, impls = ops_ap._route("attention_pool", big, 8, ops_ap._FORWARD)
        assert "triton" not in impls and "int32" in op
        assert "triton" in ops_ap._route("attention_pool", small, 8, ops_ap._FORWARD)[1]
    with pytest.raises(ValueError, match="int32 offsets"):
        attention_pool.attention_pool_forward(big, _meta(1, 8, 64))


def test_check_grid_rejects_what_cuda_cannot_launch():
    _plan.check_grid((INT32_MAX, 65535, 65535), "ok")
    with pytest.raises(ValueError, match="grid axis y needs 65536 blocks"):
        _plan.check_grid((1, 65536, 1), "k")


@pytest.mark.parametrize(("k", "n", "sym", "tile"), [(4, 4, False, (16, 16)), (50, 4, False, (64, 16)),
                                                     (50, 50, True, (64, 64)), (1000, 4, False, (128, 16)),
                                                     (1000, 1000, True, (64, 64))])  # fmt: skip
def test_ged_tiles_follow_the_set_sizes(k, n, sym, tile):
    bm, bn, bp, warps = ged.gpu_blocks(k, n, True, sym)
    assert (bm, bn) == tile
    assert bp & (bp - 1) == 0 and 32 <= bp <= 256
    def useful(tm, tn):
        return k * n / (-(-k // tm) * tm * -(-n // tn) * tn)

    # the fixed 128 x 128 tile did 1.2% useful work at K = 50, N = 4 (19.5% now)
    assert useful(bm, bn) >= useful(128, 128)
    assert bm == max(16, min(64 if sym else 128, 1 << (k - 1).bit_length()))


def test_a_failing_plan_falls_back_alone(monkeypatch):
    """One failing plan (one kernel, one tile, one dtype) moves only its calls off Triton."""
    if _backend._unavailable("triton", "cpu"):
        pytest.skip("needs the Triton interpreter")
    monkeypatch.setitem(_backend._AUTO_ORDER, "cpu", ("triton", "cpu", "torch"))
    monkeypatch.setattr(_backend, "_TRITON_FAILED", {})
    broken = haar.plan_idwt(64, torch.float32)
    monkeypatch.setattr(_plan, "FAILED", {broken.key: "RuntimeError: no kernel image for this GPU"})
    launched = []
    original = _plan.LaunchPlan.launch

    def spy(self, grid, *args):
        original(self, grid, *args)
        launched.append(self.key)

    monkeypatch.setattr(_plan.LaunchPlan, "launch", spy)
    wide = torch.randn(1, 2, 4, 4, 64, dtype=torch.float32)
    with pytest.warns(_backend.TritonFallbackWarning, match="failed before"):
        out = hf.haar_idwt2d(wide)
    torch.testing.assert_close(out, hf.ops.haar_idwt2d_reference(wide))
    assert broken.key in _backend.triton_failures()
    narrow = torch.randn(1, 2, 4, 4, 8, dtype=torch.float32)  # another plan of the same op
    torch.testing.assert_close(hf.haar_idwt2d(narrow), hf.ops.haar_idwt2d_reference(narrow))
    assert launched == [haar.plan_idwt(8, torch.float32).key]


@pytest.mark.parametrize("offdiag", [True, False])
def test_pixel_splits_give_the_unsplit_results(monkeypatch, offdiag):
    """The split path (few images on a big GPU) against the one-program-per-tile path, under the
    interpreter: the intersections are exact counts, so only the float32 IoU epilogue may differ."""
    if _backend._unavailable("triton", "cpu"):
        pytest.skip("needs the Triton interpreter")
    g = torch.Generator().manual_seed(3)
    samples = torch.rand(2, 5, 1000, generator=g)
    raters = (torch.rand(2, 3, 1000, generator=g) > 0.6).float()
    raters[0, 1] = 0  # an empty rater: the empty-union branch
    def run():  # the results without the value flags
        return (ged.ged_sums(samples, raters, 0.5, 1e-7, 1.0, offdiag)[0],
                *(ged.pairwise_overlap(samples, raters, 0.5, soft, 1e-7, 1.0, mode)[0]
                  for soft, mode in ((False, ged.MODE_IOU), (True, ged.MODE_GRAM), (True, ged.MODE_IOU))))  # fmt: skip

    whole = run()
    monkeypatch.setattr(ged, "_split_count", lambda *args: 3)  # 1000 px -> 3 ranges of 384 (BLOCK_P 128)
    split = run()
    torch.testing.assert_close(split[0], whole[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(split[1:], whole[1:]):
        torch.testing.assert_close(a, b)


def test_binarize_flags_bad_values_in_the_same_pass():
    """The GPU GED's value checks: the thresholding kernel raises an int32 flag for samples outside [0, 1] (NaN,
    Inf, 1.5) or raters that are not 0/1 (no extra pass, no host sync of its own), under the interpreter."""
    if _backend._unavailable("triton", "cpu"):
        pytest.skip("needs the Triton interpreter")
    x = torch.tensor([0.2, 0.7, 0.5, 1.0] * 600)  # 2400 values: two programs
    cases = ((ged.CHECK_PROBABILITY, float("nan"), 2300), (ged.CHECK_PROBABILITY, 1.5, 5),
             (ged.CHECK_PROBABILITY, -float("inf"), 1200), (ged.CHECK_BINARY, 0.5, 7))  # fmt: skip
    for check, bad_value, index in cases:
        flag = torch.zeros(1, dtype=torch.int32)
        out = ged.binarize(x, 0.5, check, flag)
        torch.testing.assert_close(out, (x > 0.5).half())
        want = 1 if check == ged.CHECK_BINARY else 0  # x itself is not binary
        assert int(flag) == want, check
        y = (x > 0.5).float() if check == ged.CHECK_BINARY else x.clone()
        y[index] = bad_value
        flag.zero_()
        ged.binarize(y, 0.5, check, flag)
        assert int(flag) == 1, check
    masks = torch.tensor([True, False] * 40)
    flag = torch.zeros(1, dtype=torch.int32)
    torch.testing.assert_close(ged.binarize(masks.view(torch.uint8), 0.5, ged.CHECK_BINARY, flag), masks.half())
    assert int(flag) == 0
    # thresholds compare as torch compares: in float64 for float64, in float32 for uint8 (negative too)
    x64 = torch.tensor([0.3 + 1e-9, 0.3, 0.29], dtype=torch.float64)
    torch.testing.assert_close(ged.binarize(x64, 0.3, ged.CHECK_NONE, flag), (x64 > 0.3).half())
    u8 = torch.tensor([0, 1, 2, 255], dtype=torch.uint8)
    for t in (-0.5, 0.5, 1.0, 1.5):
        torch.testing.assert_close(ged.binarize(u8, t, ged.CHECK_NONE, flag), (u8 > t).half())


def test_the_triton_ged_checks_values_in_its_kernels_not_before(monkeypatch):
    """On the Triton backend the host-side passes are gone (they cost a pass and a sync each on a GPU): bad
    values are still refused with the same message, from the kernels' flags, and never fall back."""
    if _backend._unavailable("triton", "cpu"):
        pytest.skip("needs the Triton interpreter")
    ged_ops = importlib.import_module("harmonizer_fast.ops.ged")  # the module (hf.ops.ged is a deprecated function)

    def forbidden(*args):
        raise AssertionError("a host-side value check ran on the Triton path")

    monkeypatch.setattr(ged_ops, "_check_probability_values", forbidden)
    monkeypatch.setattr(ged_ops, "check_binary", forbidden)
    monkeypatch.setenv(_backend.ENV_BACKEND, "triton")
    g = torch.Generator().manual_seed(4)
    samples, raters = torch.rand(2, 3, 6, 6, generator=g), (torch.rand(2, 2, 6, 6, generator=g) > 0.5).float()
    hf.ged(samples, raters)  # valid input: no check called, no error
    hf.pairwise_iou(samples, raters)
    with pytest.raises(_backend.InvalidInputError, match=r"ged: samples must hold probabilities, finite and within"):
        hf.ged(samples.index_fill(2, torch.tensor([1]), float("nan")), raters)
    with pytest.raises(_backend.InvalidInputError, match=r"ged: raters must be binary masks \(values 0 and 1"):
        hf.ged(samples, raters * 0.5)
    with pytest.raises(_backend.InvalidInputError, match="pairwise_iou: b must hold probabilities"):
        hf.pairwise_iou(samples, raters.index_fill(3, torch.tensor([0]), float("nan")))


def test_invalid_input_from_a_kernel_never_falls_back(monkeypatch):
    """A kernel that finds the user's values invalid raises at once; only kernel failures move to the next
    backend (with a TritonFallbackWarning)."""
    monkeypatch.setattr(_backend, "_TRITON_FAILED", {})
    monkeypatch.setattr(_backend, "_plan", lambda *args: ["triton", "torch"])
    checked = []

    def invalid(x):
        raise _backend.InvalidInputError("op: x contains NaN")

    def check(backend, x):
        checked.append(backend)

    impls = {"triton": invalid, "torch": lambda x: "reference"}
    with pytest.raises(_backend.InvalidInputError, match="contains NaN"):
        _backend.dispatch("op", torch.zeros(1), impls, {}, torch.zeros(1), check=check)
    assert checked == ["triton"]

    def broken(x):
        raise RuntimeError("no kernel image for this GPU")

    checked.clear()
    with pytest.warns(_backend.TritonFallbackWarning, match="no kernel image"):
        out = _backend.dispatch("op", torch.zeros(1), {**impls, "triton": broken}, {}, torch.zeros(1), check=check)
    assert out == "reference" and checked == ["triton", "torch"]  # the fallback checks what it must check
