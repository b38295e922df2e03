"""A run's training curves as one PNG (WORKDIR/curves.png), from its metrics.jsonl.

Three panels (four with the online probe): the InfoNCE loss with its chance level ln(K + 1) (a model that cannot tell the positive
from the queue keys), top-1 accuracy of the positive against the queue, and the mean cosine
similarity of the positive pairs and of the negatives -- the three things that say whether contrastive
pre-training is learning before any evaluation runs. Written by process 0 at the end of a run; the
README shows the demo's.
"""

from __future__ import annotations

from etils import epath

from cxrjax.train import metrics as metrics_lib


def write_training_curves(workdir, out=None) -> epath.Path | None:
    """Plot WORKDIR/metrics.jsonl into `out` (default WORKDIR/curves.png); None if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = epath.Path(workdir)
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [r for r in metrics_lib.read_jsonl(path) if "loss" in r]
    if not rows:
        return None
    probes = [r for r in metrics_lib.read_jsonl(path) if "probe_knn_auc" in r]
    step = [r["step"] for r in rows]
    series = lambda key: [r.get(key, float("nan")) for r in rows]  # noqa: E731
    fig, axes = plt.subplots(1, 4 if probes else 3, figsize=(17 if probes else 13, 3.6))
    ax = axes[0]
    ax.plot(step, series("loss"), label="InfoNCE loss (window mean)")
    if "chance_loss" in rows[-1]:
        ax.axhline(rows[-1]["chance_loss"], color="grey", ls="--", label=f"chance ln(K+1) = {rows[-1]['chance_loss']:.2f}")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(step, series("acc"), color="C2")
    ax.set_xlabel("step"), ax.set_ylabel("top-1: positive beats every queue key"), ax.set_ylim(0, 1)
    ax = axes[2]
    ax.plot(step, series("pos_sim"), label="positive pairs")
    ax.plot(step, series("neg_sim"), label="negatives (queue)")
    ax.set_xlabel("step"), ax.set_ylabel("cosine similarity"), ax.legend(fontsize=8)
    if probes:
        ax = axes[3]
        p_step = [r["step"] for r in probes]
        ax.plot(p_step, [r["probe_knn_auc"] for r in probes], marker=".", label="kNN")
        ax.plot(p_step, [r["probe_logistic_auc"] for r in probes], marker=".", label="logistic")
        ax.axhline(0.5, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("step"), ax.set_ylabel("online probe AUC (held-out images)"), ax.legend(fontsize=8)
    fig.suptitle(f"{workdir.name}: MoCo pre-training", fontsize=10)
    fig.tight_layout()
    out = epath.Path(out) if out else workdir / "curves.png"
    with out.open("wb") as f:
        fig.savefig(f, dpi=110)
    plt.close(fig)
    return out
