"""Retrieval metrics on constructed embeddings, SSIM/PSNR against hand computations, the linear probe."""

import numpy as np
import pytest

from cxrjax.eval import regeneration as R
from cxrjax.eval import retrieval as E


def test_ranks_and_recall_on_constructed_scores():
    # query i's relevant item is i; item i is placed at rank i + 1 by construction
    n = 12
    sim = np.zeros((n, n))
    for q in range(n):
        others = [g for g in range(n) if g != q]
        order = others[:q] + [q] + others[q:]  # q sits at position q
        sim[q, order] = np.linspace(1, 0, n)
    rel = np.eye(n, dtype=bool)
    np.testing.assert_array_equal(E.ranks(sim, rel), np.arange(1, n + 1))
    m = E.retrieval_metrics(sim, rel)
    assert m["R@1"] == pytest.approx(1 / 12) and m["R@5"] == pytest.approx(5 / 12) and m["R@10"] == pytest.approx(10 / 12)
    assert m["mean_rank"] == pytest.approx(6.5) and m["median_rank"] == pytest.approx(6.5)


def test_any_relevant_item_counts_and_ties_do_not_help():
    sim = np.array([[0.9, 0.8, 0.7], [0.5, 0.5, 0.1]])
    rel = np.array([[False, True, True], [True, False, False]])
    np.testing.assert_array_equal(E.ranks(sim, rel), [2, 1])  # best relevant of row 0 is 2nd; a tie is not above
    with pytest.raises(ValueError, match="at least one relevant"):
        E.ranks(sim, np.zeros_like(rel))


def test_both_directions_with_duplicate_reports():
    reports = ["a", "b", "a", "c"]
    distinct, of_image = E.report_groups(reports)
    assert distinct == ["a", "b", "c"] and of_image.tolist() == [0, 1, 0, 2]
    text = np.eye(3)
    perfect = text[of_image] + 0.01 * np.random.default_rng(0).normal(size=(4, 3))
    r = E.both_directions(perfect, text, of_image)
    assert r["image_to_report"]["R@1"] == 1.0 and r["report_to_image"]["R@1"] == 1.0
    assert r["report_to_image"]["n_queries"] == 3 and r["image_to_report"]["n_gallery"] == 3
    swapped = text[[1, 0, 1, 2]]  # images 0-2 point at the wrong report
    r = E.both_directions(swapped, text, of_image)
    assert r["image_to_report"]["R@1"] == pytest.approx(1 / 4)
    assert r["image_to_report"]["mean_rank"] == pytest.approx((2 + 2 + 2 + 1) / 4)


def test_binary_labels_drop_blank_and_uncertain():
    y, keep = E.binary_labels(np.array([1, 0, np.nan, -1, 1], np.float32))
    assert keep.tolist() == [True, True, False, False, True] and y[keep].tolist() == [1, 0, 1]


def test_linear_probe_separates_separable_features():
    r = np.random.default_rng(0)
    y = np.r_[np.zeros(40, int), np.ones(40, int)]
    x = r.normal(size=(80, 5)) + y[:, None] * 3.0
    out = E.linear_probe(x[::2], y[::2], x[1::2], y[1::2])
    assert out["auc"] > 0.99 and out["n_train"] == 40 and out["test_positives"] == 20
    with pytest.raises(ValueError, match="only one class"):
        E.linear_probe(x, np.zeros(80, int), x, y)


def reference_ssim(a, b, data_range=255.0):
    """scikit-image's structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False),
    written out with scipy: filter with a Gaussian truncated at 3.5 sigma, crop the 5-pixel border."""
    from scipy.ndimage import gaussian_filter

    f = lambda x: gaussian_filter(x, 1.5, truncate=3.5)
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = f(a), f(b)
    va, vb, cov = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return s[5:-5, 5:-5].mean()


def test_ssim_matches_the_scikit_image_formula():
    r = np.random.default_rng(0)
    a = r.integers(0, 256, (2, 40, 48)).astype(np.float64)
    b = np.clip(a + r.normal(0, 20, a.shape), 0, 255)
    got = np.asarray(R.ssim(a, b))
    for i in range(2):
        assert got[i] == pytest.approx(reference_ssim(a[i], b[i]), abs=2e-4)
    assert np.asarray(R.ssim(a, a)) == pytest.approx(1.0, abs=1e-5)
    # two constant images: SSIM = luminance term only = (2 m1 m2 + c1) / (m1^2 + m2^2 + c1)
    c1 = (0.01 * 255) ** 2
    const = np.asarray(R.ssim(np.full((1, 20, 20), 100.0), np.full((1, 20, 20), 120.0)))[0]
    assert const == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1), rel=1e-4)


def test_psnr_counts_masked_pixels_only():
    a = np.zeros((1, 4, 4))
    b = np.zeros((1, 4, 4))
    b[0, :2] = 10.0  # error 10 on the top half
    b[0, 3] = 200.0  # outside the mask: ignored
    mask = np.zeros((1, 4, 4), bool)
    mask[0, :2] = True
    assert R.psnr_masked(a, b, mask)[0] == pytest.approx(10 * np.log10(255**2 / 100))
