"""Pairwise IoU, GED and the GED loss (docs/architecture.md, "Conventions", paper Eq. 7) on every backend, against a
deliberately naive float64 numpy transcription written here pair by pair, plus gradients, properties,
torch.library contracts and bad inputs."""

import importlib

import numpy as np
import pytest
import torch
from conftest import CPU_CASES, GPU_CASES, case_id
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import harmonizer_fast as hf

# the module, not the function of the same name that harmonizer_fast.ops exports
ged_mod = importlib.import_module("harmonizer_fast.ops.ged")
CONVENTIONS_ALL = hf.metrics.CONVENTIONS

CONVENTIONS = ("dpersona", "phiseg", "unbiased")


# ---------------------------------------------------------------------------------------------------------
# The independent transcription of docs/architecture.md, "Conventions": one pair at a time, in float64 numpy.


def np_iou(a: np.ndarray, b: np.ndarray, convention: str) -> float:
    inter = float(np.logical_and(a, b).sum())
    union = float(np.logical_or(a, b).sum())
    if convention == "dpersona":
        return inter / (union + 1e-8)
    return 1.0 if union == 0 else inter / union


def np_ged(samples: np.ndarray, raters: np.ndarray, convention: str, threshold: float = 0.5):
    """(ged, cross, within_samples, within_raters) for one image: samples (K, H, W), raters (N, H, W)."""
    s = samples > threshold
    y = raters > 0.5

    def d(a, b):
        return 1.0 - np_iou(a, b, convention)

    cross = np.mean([d(s[k], y[n]) for k in range(len(s)) for n in range(len(y))])

    def within(x):
        m = len(x)
        vals = [d(x[i], x[j]) for i in range(m) for j in range(m) if not (convention == "unbiased" and i == j)]
        return float(np.mean(vals)) if vals else 0.0

    ws, wr = within(s), within(y)
    return 2 * cross - ws - wr, cross, ws, wr


def np_pairwise_iou(a, b, soft, empty_iou, threshold=0.5):
    out = np.zeros((a.shape[0], a.shape[1], b.shape[1]))
    for bi in range(a.shape[0]):
        for i in range(a.shape[1]):
            for j in range(b.shape[1]):
                if soft:
                    p, q = a[bi, i].astype(np.float64), b[bi, j].astype(np.float64)
                    inter = (p * q).sum()
                    union = p.sum() + q.sum() - inter
                else:
                    p, q = a[bi, i] > threshold, b[bi, j] > threshold
                    inter = float(np.logical_and(p, q).sum())
                    union = float(np.logical_or(p, q).sum())
                out[bi, i, j] = empty_iou if union == 0 else inter / union
    return out


def np_ged_loss(probs, raters):
    """Paper Eq. 7 per image with the soft IoU distance (smoothed by one pixel), float64, pair by pair."""
    out = []
    for p, a in zip(probs.astype(np.float64), raters.astype(np.float64)):
        k, n = len(p), len(a)

        def d(x, y):
            inter = (x * y).sum()
            return 1.0 - (inter + 1.0) / (x.sum() + y.sum() - inter + 1.0)

        cross = 2.0 / (k * n) * sum(d(p[i], a[j]) for i in range(k) for j in range(n))
        within = 0.0
        if k > 1:
            within = 2.0 / (k * (k - 1)) * sum(d(p[i], p[j]) for i in range(k) for j in range(i + 1, k))
        out.append(cross - within)
    return np.array(out)


# ---------------------------------------------------------------------------------------------------------
# Inputs.


def make_case(b, k, n, h, w, seed, empty_samples=(), empty_raters=(), full=()):
    """Probabilities with blob-like structure (so IoUs are spread over (0, 1)) and binary raters."""
    g = torch.Generator().manual_seed(seed)
    axis_h, axis_w = torch.linspace(-1, 1, h, dtype=torch.float64), torch.linspace(-1, 1, w, dtype=torch.float64)
    yy, xx = torch.meshgrid(axis_h, axis_w, indexing="ij")
    radius = 0.3 + 0.5 * torch.rand((b, k + n, 1, 1), generator=g, dtype=torch.float64)
    shift = 0.3 * (torch.rand((b, k + n, 2, 1, 1), generator=g, dtype=torch.float64) - 0.5)
    dist = ((yy - shift[:, :, 0]) ** 2 + (xx - shift[:, :, 1]) ** 2).sqrt()
    noise = 0.15 * torch.randn((b, k + n, h, w), generator=g, dtype=torch.float64)
    prob = torch.sigmoid((radius - dist) * 8 + noise)
    samples, raters = prob[:, :k].clone(), (prob[:, k:] > 0.5).double()
    for bi, i in empty_samples:
        samples[bi, i] = 0.1
    for bi, i in empty_raters:
        raters[bi, i] = 0
    for bi, i in full:
        samples[bi, i] = 0.9
    return samples, raters


GED_CASES = {
    "basic": dict(b=2, k=5, n=4, h=12, w=12),
    "non-square": dict(b=2, k=3, n=4, h=7, w=19),
    "one-sample": dict(b=2, k=1, n=4, h=9, w=9),
    "one-rater": dict(b=2, k=4, n=1, h=9, w=9),
    "seven-raters": dict(b=1, k=6, n=7, h=10, w=11),
    "empties": dict(b=2, k=4, n=4, h=8, w=8, empty_samples=[(0, 1), (0, 2), (1, 0)], empty_raters=[(0, 3), (1, 0)]),
    "all-empty": dict(b=1, k=3, n=2, h=5, w=5, empty_samples=[(0, 0), (0, 1), (0, 2)], empty_raters=[(0, 0), (0, 1)]),
    "odd-pixels": dict(b=1, k=17, n=3, h=9, w=15),  # 135 pixels: a partial 64-bit word, tiles with a ragged edge
}


def expected_ged(samples, raters, convention, threshold=0.5):
    rows = [np_ged(s.double().cpu().numpy(), r.double().cpu().numpy(), convention, threshold)
            for s, r in zip(samples, raters)]  # fmt: skip
    return torch.tensor(rows, dtype=torch.float64)  # (B, 4)


# ---------------------------------------------------------------------------------------------------------
# GED.


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("name", list(GED_CASES))
def test_ged_matches_numpy_transcription(case, convention, name, use_backend):
    device = use_backend(*case)
    samples, raters = make_case(**GED_CASES[name], seed=len(name))
    ref = expected_ged(samples, raters, convention)
    terms = hf.ged_terms(samples.float().to(device), raters.float().to(device), convention=convention)
    assert terms.ged.shape == (samples.shape[0],) and terms.ged.dtype == torch.float32
    got = torch.stack([t.double().cpu() for t in terms], dim=1)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hf.ged(samples.float().to(device), raters.float().to(device), convention=convention),
                               terms.ged)  # fmt: skip


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize(
    "s_dtype,r_dtype",
    [(torch.float64, torch.bool), (torch.float32, torch.uint8), (torch.uint8, torch.float32), (torch.bool, torch.bool)],
    ids=str,
)
def test_ged_mixed_dtypes(case, s_dtype, r_dtype, use_backend):
    device = use_backend(*case)
    samples, raters = make_case(b=2, k=6, n=3, h=11, w=13, seed=3)
    ref = expected_ged(samples, raters, "dpersona")[:, 0]
    s = samples.to(s_dtype) if s_dtype.is_floating_point else (samples > 0.5).to(s_dtype)
    got = hf.ged(s.to(device), raters.to(r_dtype).to(device))
    torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_ged_threshold_is_strict(case, use_backend):
    device = use_backend(*case)
    samples = torch.full((1, 2, 4, 4), 0.5)
    samples[0, 0, :2] = 0.75
    raters = torch.zeros((1, 2, 4, 4))
    raters[0, 0, :2] = 1
    raters[0, 1, :2, :2] = 1
    got = hf.ged_terms(samples.to(device), raters.to(device), threshold=0.5)
    ref = expected_ged(samples, raters, "dpersona")[0]
    torch.testing.assert_close(torch.stack([t.double().cpu()[0] for t in got]), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_threshold_compares_in_the_input_precision(case, dtype, use_backend):
    """x > threshold as torch compares it: fp64 values within fp32 rounding of a threshold that fp32 cannot
    hold (0.3 rounds up to 0.30000001) are foreground in fp64; fp32 values compare against fp32(0.3)."""
    device = use_backend(*case)
    samples = torch.zeros((1, 3, 4, 4), dtype=torch.float64)
    samples[0, 0] = 0.3 + 1e-9  # above 0.3, below float32(0.3)
    samples[0, 1, :2] = 0.31
    samples = samples.to(dtype)
    raters = torch.zeros((1, 2, 4, 4))
    raters[0, 0] = 1
    raters[0, 1, :2] = 1
    binary = (samples > 0.3).double()
    assert bool(binary[0, 0].all()) == (dtype == torch.float64)  # the case is the one it claims to be
    got = hf.pairwise_iou(samples.to(device), raters.to(device), threshold=0.3).double().cpu()
    torch.testing.assert_close(got, hf.pairwise_iou(binary, raters).double())
    terms = hf.ged_terms(samples.to(device), raters.to(device), threshold=0.3)
    ref = expected_ged(binary, raters, "dpersona")[0]
    torch.testing.assert_close(torch.stack([t.double().cpu()[0] for t in terms]), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_ged_large_k_against_reference(case, use_backend):
    """K beyond one tile in every direction, compared with the torch reference (numpy pairs would be slow)."""
    device = use_backend(*case)
    samples, raters = make_case(b=2, k=70, n=4, h=16, w=20, seed=9)
    for convention, (eps, empty_iou, offdiag, undefined_empty) in CONVENTIONS_ALL.items():
        if undefined_empty:  # kohl: NaN pairs, not the fused sums (test_convention_table_is_regenerated_from_the_code)
            continue
        got = hf.ged_terms(samples.float().to(device), raters.float().to(device), convention=convention)
        sums = ged_mod.ged_sums_reference(ged_mod._flat(samples), ged_mod._flat(raters), 0.5, eps, empty_iou, offdiag)
        pairs = 70 * 69 if offdiag else 70 * 70
        torch.testing.assert_close(got.within_samples.double().cpu(), sums[:, 1] / pairs, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.cross.double().cpu(), sums[:, 0] / 280, rtol=1e-6, atol=1e-6)


def test_triton_chunking_over_images(monkeypatch, use_backend):
    """The Triton launcher splits the batch to bound its float16 copy: the chunked result is the same."""
    use_backend("triton", "cpu")
    from harmonizer_fast.kernels import ged as kernels_ged

    samples, raters = make_case(b=3, k=5, n=2, h=8, w=8, seed=4)
    whole = hf.ged_terms(samples.float(), raters.float())
    monkeypatch.setattr(kernels_ged, "_MAX_CHUNK_BYTES", 1)  # one image per chunk
    chunked = hf.ged_terms(samples.float(), raters.float())
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_ged_is_deterministic(case, use_backend):
    device = use_backend(*case)
    samples, raters = make_case(b=2, k=20, n=4, h=16, w=16, seed=5)
    s, r = samples.float().to(device), raters.float().to(device)
    first = hf.ged_terms(s, r)
    for _ in range(3):
        again = hf.ged_terms(s, r)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# Pairwise IoU.


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("empty_iou", [0.0, 1.0])
def test_pairwise_iou_binary(case, dtype, empty_iou, use_backend):
    device = use_backend(*case)
    a, b = make_case(b=2, k=5, n=3, h=9, w=14, seed=6, empty_samples=[(0, 0)], empty_raters=[(0, 1), (1, 2)])
    a[0, 1] = 0.0  # a truly empty mask against the empty rater masks
    if not dtype.is_floating_point:
        a = a > 0.5
    ref = np_pairwise_iou(a.double().numpy(), b.numpy(), False, empty_iou)
    got = hf.pairwise_iou(a.to(dtype).to(device), b.to(dtype).to(device), empty_iou=empty_iou)
    assert got.shape == (2, 5, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got.double().cpu(), torch.from_numpy(ref), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_pairwise_iou_soft(case, dtype, use_backend):
    device = use_backend(*case)
    a, b = make_case(b=2, k=4, n=3, h=10, w=7, seed=7)
    a[1, 2] = 0.0
    b = b * torch.rand(b.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    b[1, 0] = 0.0
    if case[0] == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernel accumulates soft masks in float32 (float64 runs on the C++ and torch paths)")
    ref = np_pairwise_iou(a.numpy(), b.numpy(), True, 0.5)
    got = hf.pairwise_iou(a.to(dtype).to(device), b.to(dtype).to(device), soft=True, empty_iou=0.5)
    assert got.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double().cpu(), torch.from_numpy(ref), rtol=tol, atol=tol)


def test_pairwise_iou_soft_is_differentiable():
    a, b = make_case(b=1, k=3, n=2, h=6, w=6, seed=8)
    a.requires_grad_()
    got = hf.pairwise_iou(a, b, soft=True)
    grad = torch.autograd.grad(got.sum(), a)[0]
    a2 = a.detach().clone().requires_grad_()
    inter = torch.einsum("bkhw,bnhw->bkn", a2, b)
    ref = inter / (a2.sum((2, 3))[:, :, None] + b.sum((2, 3))[:, None, :] - inter)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(grad, torch.autograd.grad(ref.sum(), a2)[0])


# ---------------------------------------------------------------------------------------------------------
# GED loss (paper Eq. 7).


def torch_ged_loss(probs, raters):
    """Autograd reference: einsum Gram products, every pair, float64."""
    k = probs.shape[1]
    ip = torch.einsum("bkhw,bnhw->bkn", probs, raters)
    sp, sr = probs.sum((2, 3)), raters.sum((2, 3))
    cross = 1 - (ip + 1) / (sp[:, :, None] + sr[:, None, :] - ip + 1)
    loss = 2 * cross.mean((1, 2))
    if k > 1:
        ipp = torch.einsum("bkhw,bjhw->bkj", probs, probs)
        within = 1 - (ipp + 1) / (sp[:, :, None] + sp[:, None, :] - ipp + 1)
        off = ~torch.eye(k, dtype=torch.bool)
        loss = loss - (within * off).sum((1, 2)) / (k * (k - 1))
    return loss.mean()


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ged_loss_value_and_gradient(case, k, dtype, use_backend):
    device = use_backend(*case)
    if case[0] == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernel accumulates soft masks in float32")
    probs, raters = make_case(b=2, k=k, n=3, h=9, w=10, seed=10 + k)
    probs[0, 0] = 0.0  # an all-zero map: the smoothing keeps 0/0 away
    p = probs.to(dtype).to(device).clone().requires_grad_()
    loss = hf.ged_loss(p, raters.to(dtype).to(device))
    assert loss.dim() == 0
    ref_value = float(np.mean(np_ged_loss(probs.numpy(), raters.numpy())))
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert abs(loss.item() - ref_value) <= tol * max(1.0, abs(ref_value))
    (grad,) = torch.autograd.grad(loss, p)
    p64 = probs.clone().requires_grad_()
    (ref_grad,) = torch.autograd.grad(torch_ged_loss(p64, raters), p64)
    gtol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=gtol, atol=gtol * ref_grad.abs().max().item())


def test_ged_loss_gradcheck():
    probs, raters = make_case(b=1, k=3, n=2, h=5, w=4, seed=12)
    probs.requires_grad_()
    assert torch.autograd.gradcheck(lambda p: hf.ged_loss(p, raters), (probs,))


def test_ged_loss_has_no_empty_attractor():
    """Empty samples against raters that drew a lesion score worse than samples that draw it."""
    _, raters = make_case(b=1, k=4, n=4, h=16, w=16, seed=14)
    empty = torch.zeros_like(raters)
    assert hf.ged_loss(raters.clone(), raters) < hf.ged_loss(empty, raters)
    # and two empty maps are at distance 0: empty samples against empty raters cost nothing
    assert abs(float(hf.ged_loss(empty, empty))) < 1e-6


def test_ged_loss_rewards_matching_the_raters():
    """The loss is lower when the samples are the rater masks than when they all collapse onto one."""
    _, raters = make_case(b=1, k=4, n=4, h=16, w=16, seed=13)
    matched = hf.ged_loss(raters.clone(), raters)
    collapsed = hf.ged_loss(raters[:, :1].expand(-1, 4, -1, -1).clone(), raters)
    assert matched < collapsed


# ---------------------------------------------------------------------------------------------------------
# Properties.

masks = st.integers(0, 2**31 - 1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=masks, k=st.integers(1, 6), n=st.integers(1, 5), h=st.integers(1, 9), w=st.integers(1, 9),
       p=st.floats(0.0, 1.0))  # fmt: skip
def test_property_ged_matches_transcription(seed, k, n, h, w, p):
    g = torch.Generator().manual_seed(seed)
    samples = torch.rand((1, k, h, w), generator=g, dtype=torch.float64) * (0.5 + 0.5 * p)  # probabilities
    raters = (torch.rand((1, n, h, w), generator=g, dtype=torch.float64) < p * 0.6).double()
    for convention in CONVENTIONS:
        got = hf.ged_terms(samples.float(), raters.float(), convention=convention)
        ref = expected_ged(samples.float().double(), raters, convention)[0]
        torch.testing.assert_close(torch.stack([t.double()[0] for t in got]), ref, rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=masks, k=st.integers(1, 6), h=st.integers(1, 9), w=st.integers(1, 9))
def test_property_identical_sets_have_zero_ged(seed, k, h, w):
    g = torch.Generator().manual_seed(seed)
    sets = (torch.rand((2, k, h, w), generator=g) < 0.4).float()
    for convention in ("dpersona", "phiseg"):  # the biased estimators: d(S, Y) averages equal the within ones
        assert torch.allclose(hf.ged(sets, sets, convention=convention), torch.zeros(2), atol=1e-6)
    iou = hf.pairwise_iou(sets, sets)
    torch.testing.assert_close(iou, iou.transpose(1, 2))
    assert bool(((iou >= 0) & (iou <= 1)).all())


# ---------------------------------------------------------------------------------------------------------
# torch.library contracts and bad inputs.


def test_opcheck_and_compile():
    samples, raters = make_case(b=2, k=3, n=2, h=6, w=5, seed=14)
    s, r = ged_mod._flat(samples.float()), ged_mod._flat(raters.float())
    torch.library.opcheck(ged_mod._ged_sums_op, (s, r, 0.5, 1e-8, 0.0, False))
    torch.library.opcheck(ged_mod._overlap_op, (s, r, 0.5, False, 0.0, 0.0, 1))
    torch.library.opcheck(ged_mod._overlap_op, (s.requires_grad_(), r, 0.0, True, 0.0, 0.0, 0))
    compiled = torch.compile(lambda p, y: hf.ged_loss(p, y), fullgraph=True)
    torch.testing.assert_close(compiled(samples.float(), raters.float()), hf.ged_loss(samples.float(), raters.float()))


PROB = "must hold probabilities"
BAD = [
    (lambda s, r: hf.ged(s[:1], r), ValueError, "same batch size"),
    (lambda s, r: hf.ged(s[..., :5], r), ValueError, "same H x W"),
    (lambda s, r: hf.ged(s, r * 0.5), ValueError, "raters must be binary"),
    (lambda s, r: hf.ged(s.index_fill(2, torch.tensor([1]), float("nan")), r), ValueError, "samples " + PROB),
    (lambda s, r: hf.ged(s.index_fill(3, torch.tensor([2]), 1.5), r), ValueError, "samples " + PROB),
    (lambda s, r: hf.ged(s - 0.5, r), ValueError, "samples " + PROB),  # logits
    (lambda s, r: hf.ged(s.index_fill(2, torch.tensor([0]), float("-inf")), r), ValueError, "samples must hold"),
    (lambda s, r: hf.ged(s, r, threshold=1.0), ValueError, r"threshold must be a number in \[0, 1\)"),
    (lambda s, r: hf.pairwise_iou(s * 3, r), ValueError, "a " + PROB),
    (lambda s, r: hf.ged(s[:, :0], r), ValueError, "K = 0"),
    (lambda s, r: hf.ged(s[:0], r[:0]), ValueError, "empty batch"),
    (lambda s, r: hf.ged(s[0], r[0]), ValueError, "4-D"),
    (lambda s, r: hf.ged(s, r, convention="nope"), ValueError, "convention"),
    (lambda s, r: hf.ged(s.numpy(), r), TypeError, "torch.Tensor"),
    (lambda s, r: hf.pairwise_iou(s, r.bool(), soft=True), TypeError, "floating-point"),
    (lambda s, r: hf.pairwise_iou(s.index_fill(3, torch.tensor([0]), float("nan")), r), ValueError, "a " + PROB),
    (lambda s, r: hf.ged_loss(s.index_fill(3, torch.tensor([0]), float("inf")), r), ValueError, "probs " + PROB),
    (lambda s, r: hf.ged_loss(s, r[:, :, :3]), ValueError, "same H x W"),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_inputs(case, i, use_backend):
    device = use_backend(*case)
    fn, exc, msg = BAD[i]
    samples, raters = make_case(b=2, k=3, n=2, h=6, w=6, seed=15)
    s, r = samples.float().to(device), raters.float().to(device)
    with pytest.raises(exc, match=msg):
        fn(s, r)


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.parametrize("bad", [1.0000001, -1e-30, float("inf"), float("nan")], ids=["above1", "below0", "inf", "nan"])
def test_values_outside_the_unit_interval_are_refused_wherever_they_sit(case, bad, use_backend):
    """Samples are probabilities: a value outside [0, 1] anywhere (in a 64-pixel word the SIMD packing
    compares, or in the tail the scalar loop packs) is refused with the same message on every backend; bool
    and uint8 masks (0/255) are thresholded as they are."""
    device = use_backend(*case)
    samples, raters = make_case(b=2, k=3, n=2, h=16, w=13, seed=16)  # 208 pixels: 3 full words and a tail
    s, r = samples.float().to(device), raters.float().to(device)
    for pixel in (0, 70, 191, 207):
        bad_s = s.clone()
        bad_s.view(2, 3, -1)[1, 2, pixel] = bad
        with pytest.raises(ValueError, match=r"ged: samples must hold probabilities, finite and within \[0, 1\]"):
            hf.ged(bad_s, r)
        with pytest.raises(ValueError, match=r"pairwise_iou: b must hold probabilities"):
            hf.pairwise_iou(r, bad_s)
    as_u8 = ((s > 0.5).to(torch.uint8) * 255, (s > 0.5).bool())
    for masks in as_u8:
        torch.testing.assert_close(hf.ged(masks, r), hf.ged((s > 0.5).float(), r))


# ---------------------------------------------------------------------------------------------------------
# GPU: every backend in float32, float16 and bfloat16 (binary masks are exact in every dtype).


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_gpu_ged_and_loss(case, dtype, convention, use_backend):
    device = use_backend(*case)
    samples, raters = make_case(b=3, k=40, n=4, h=33, w=31, seed=16, empty_samples=[(0, 1)], empty_raters=[(1, 2)])
    ref = expected_ged(samples.to(dtype).double(), raters, convention)
    got = hf.ged_terms(samples.to(dtype).to(device), raters.to(dtype).to(device), convention=convention)
    torch.testing.assert_close(torch.stack([t.double().cpu() for t in got], 1), ref, rtol=1e-5, atol=1e-5)
    iou = hf.pairwise_iou(samples.to(dtype).to(device), raters.bool().to(device))
    ref_iou = np_pairwise_iou(samples.to(dtype).double().numpy(), raters.numpy(), False, 0.0)
    torch.testing.assert_close(iou.double().cpu(), torch.from_numpy(ref_iou), rtol=1e-6, atol=1e-6)
    p = samples.to(dtype).to(device).requires_grad_()
    loss = hf.ged_loss(p, raters.to(dtype).to(device))
    (grad,) = torch.autograd.grad(loss, p)
    p64 = samples.to(dtype).double().requires_grad_()
    ref_loss = torch_ged_loss(p64, raters)
    (ref_grad,) = torch.autograd.grad(ref_loss, p64)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert abs(loss.item() - ref_loss.item()) <= tol
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=tol, atol=tol * ref_grad.abs().max().item())


def test_convention_table_is_regenerated_from_the_code():
    """docs/ged-conventions.md is the output of harmonizer_fast.conventions, and its values are each published
    convention's formula, transcribed here in numpy pair by pair."""
    from pathlib import Path

    from harmonizer_fast import conventions

    doc = Path(__file__).resolve().parents[1] / "docs" / "ged-conventions.md"
    assert doc.read_text() == conventions.table_markdown(), "regenerate: python -m harmonizer_fast.conventions"

    samples, raters = (t[0].numpy() > 0.5 for t in conventions.example())

    def dist(a, b, eps, empty):
        union = np.logical_or(a, b).sum()
        if union == 0:
            return 1.0 - empty
        return 1.0 - np.logical_and(a, b).sum() / (union + eps)

    def mean(xs, ys, eps, empty, offdiag, skip_nan=False):
        d = [dist(x, y, eps, empty) for i, x in enumerate(xs) for j, y in enumerate(ys) if not (offdiag and i == j)]
        return float(np.nanmean(d) if skip_nan else np.mean(d))

    def ged(s, eps, empty, offdiag, kohl=False):
        cross = mean(s, raters, eps, empty, False)
        return 2 * cross - mean(s, s, eps, empty, offdiag) - mean(raters, raters, eps, empty, offdiag, kohl), cross

    # kohl: calc_energy_distances of SimonKohl/probabilistic_unet, one class: IoU NaN for two empty masks,
    # np.mean over d(Y, S) and d(S, S'), np.nanmean over d(Y, Y').
    published = {"dpersona": (1e-8, 0.0, False), "phiseg": (0.0, 1.0, False), "unbiased": (0.0, 1.0, True),
                 "kohl": (0.0, np.nan, False)}  # fmt: skip
    got = conventions.values()
    assert set(got) == set(published)
    for name, (eps, empty, offdiag) in published.items():
        want, cross = ged(samples, eps, empty, offdiag, name == "kohl")
        assert got[name]["ged"] == pytest.approx(want, abs=1e-6, nan_ok=True), name  # float32 IoU
        assert got[name]["cross"] == pytest.approx(cross, abs=1e-6, nan_ok=True)
        want2, _ = ged(samples[:2], eps, empty, offdiag, name == "kohl")
        assert got[name]["ged_nonempty_samples"] == pytest.approx(want2, abs=1e-6), name
    assert np.isnan(got["kohl"]["ged"]) and not np.isnan(got["kohl"]["within_raters"])
    assert len({round(v["ged"], 6) for v in got.values() if not np.isnan(v["ged"])}) == 3  # tells them apart
    assert len({round(v["ged_nonempty_samples"], 6) for v in got.values()}) == 4
