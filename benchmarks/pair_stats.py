r"""MedAug's pair strategies on the real CheXpert table: self-pair rates of both rules, and whether
cxrjax's partner draw follows MedAug's eq. 2 (a chi-square test).

    python benchmarks/pair_stats.py                                    # ../shared/data/metadata/chexpert_train.csv.gz
    python benchmarks/pair_stats.py --queries=20000 --epochs=200 --markdown

For every strategy: the share of images with no qualifying partner (they fall back to two augmentations
of themselves), the mean number of candidates, and the self-pair rate -- the share of draws that pair
an image with itself -- under cxrjax's exclude-self rule (only the fallbacks) and under eq. 2 (the query
is in its own candidate set: 1 / (candidates + 1) per image, averaged).

The draw test: eq. 2 says the partner is uniform over {x} U group(x). `--queries` random images with
2..8 candidates (self included) get a partner in each of `--epochs` epochs from cxrjax's counter-based
sampler (`pairs.sample_positive`, a hash of (seed, epoch, row)); the counts per (image, candidate) are
tested against uniform with Pearson's chi-square, pooled over images (dof = sum of (|group| - 1)).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = ROOT.parent / "shared" / "data" / "metadata" / "chexpert_train.csv.gz"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", default=str(DEFAULT_CSV), help="CheXpert train.csv(.gz)")
    p.add_argument("--queries", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", default="study-same_lat-any", help="strategy of the draw test")
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    p.add_argument("--rows", type=int, default=0, help="use only the first N rows (smoke test)")
    return p.parse_args(argv)


def rates_table(table) -> list[dict]:
    from cxrjax.data import pairs

    out = []
    for name in pairs.STRATEGIES:
        s = pairs.group_size_stats(pairs.build_pair_index(table, name))
        candidates = s["n_pairs"] - s["n_fallback"]  # other images, over all rows
        out.append({"strategy": name, "fallback": s["frac_fallback"],
                    "mean_candidates": candidates / s["n_images"],
                    "self_exclude": s["self_pair_rate_exclude_self"],
                    "self_eq2": s["self_pair_rate_include_self"]})
    return out


def draw_test(table, strategy: str, queries: int, epochs: int, seed: int) -> dict:
    """Pearson's chi-square of cxrjax's partner counts against eq. 2's uniform draw."""
    from scipy import stats

    from cxrjax.data import pairs

    idx = pairs.with_self(pairs.build_pair_index(table, strategy), True)
    sizes = idx.sizes
    eligible = np.flatnonzero((sizes >= 2) & (sizes <= 8))
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(eligible, size=min(queries, len(eligible)), replace=False))
    counts = {int(r): np.zeros(int(sizes[r]), np.int64) for r in rows}
    starts = idx.offsets[rows]
    self_hits = 0
    for e in range(epochs):
        partner = pairs.sample_positive(idx, rows, seed, e)
        self_hits += int((partner == rows).sum())
        for r, st, p in zip(rows, starts, partner):
            g = idx.members[st:st + sizes[r]]
            counts[int(r)][int(np.searchsorted(g, p))] += 1
    chi2 = sum(float(((c - epochs / len(c)) ** 2).sum() / (epochs / len(c))) for c in counts.values())
    dof = sum(len(c) - 1 for c in counts.values())
    expected_self = float(np.mean(1.0 / sizes[rows]))
    return {"strategy": strategy, "queries": len(rows), "epochs": epochs, "draws": len(rows) * epochs,
            "chi2": chi2, "dof": dof, "p_value": float(stats.chi2.sf(chi2, dof)),
            "self_rate_observed": self_hits / (len(rows) * epochs), "self_rate_expected": expected_self}


def main(argv=None) -> int:
    args = parse_args(argv)
    from cxrjax.data import metadata

    csv = Path(args.csv)
    if not csv.is_file():
        print(f"no CheXpert table at {csv} (../shared/data is needed): nothing to measure", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    table = metadata.load_chexpert_csv(csv).table
    if args.rows:
        table = table.iloc[:args.rows].reset_index(drop=True)
    print(f"CheXpert table: {len(table):,} images, {table['patient_id'].nunique():,} patients, "
          f"{table['study_id'].nunique():,} studies ({time.perf_counter() - t0:.1f} s to load)")
    rows = rates_table(table)
    head = ("strategy", "no partner (fallback)", "mean other candidates", "self-pairs, exclude-self rule",
            "self-pairs, eq. 2 (MedAug)")
    fmt = "| {} | {:.1%} | {:.2f} | {:.1%} | {:.1%} |" if args.markdown else "{:<26}{:>10.1%}{:>10.2f}{:>10.1%}{:>10.1%}"
    if args.markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    else:
        print(f"{'strategy':<26}{'fallback':>10}{'cands':>10}{'self/excl':>10}{'self/eq2':>10}")
    for r in rows:
        print(fmt.format(r["strategy"], r["fallback"], r["mean_candidates"], r["self_exclude"], r["self_eq2"]))
    t1 = time.perf_counter()
    d = draw_test(table, args.strategy, args.queries, args.epochs, args.seed)
    print(f"\ndraw test, {d['strategy']}: {d['queries']:,} images with 2-8 candidates (self included) x "
          f"{d['epochs']} epochs = {d['draws']:,} draws: chi2 = {d['chi2']:.1f} on {d['dof']:,} dof, "
          f"p = {d['p_value']:.3f}; self-pairs {d['self_rate_observed']:.4f} observed vs "
          f"{d['self_rate_expected']:.4f} expected ({time.perf_counter() - t1:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
