"""The report's figures (PNG, matplotlib's Agg backend without pyplot's global state)."""

from __future__ import annotations

from pathlib import Path

from ci_core.harness.plan import CLEAN_ATTACK


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg backend, without pyplot's global state
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_roc(report: dict, path: Path) -> bool:
    groups = [g for g in report["detectors"] if g["model_level"]["roc"] is not None]
    if not groups:
        return False
    figure = _new_figure(5, 5)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    for g in groups:
        roc = g["model_level"]["roc"]
        ax.plot(roc["fpr"], roc["tpr"], marker=".", label=f"{g['label']} (AUROC {g['model_level']['auroc']:.3f})")
    ax.set(xlabel="False positive rate", ylabel="True positive rate", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
           title="ROC of s_max (model level)")
    ax.legend(loc="lower right", fontsize="small")
    figure.savefig(path, dpi=120)
    return True


def plot_anomaly_scores(report: dict, path: Path) -> bool:
    groups = [g for g in report["detectors"] if g["anomaly_by_attack"]]
    if not groups:
        return False
    figure = _new_figure(max(4.0, 3.2 * len(groups)), 3.6)
    axes = figure.subplots(1, len(groups), squeeze=False)[0]
    for ax, g in zip(axes, groups):
        attacks = g["anomaly_by_attack"]
        names = [a["attack"] for a in attacks]
        # An attack whose every model was unscannable has no finite s_max: no bar, a label where it would stand.
        means = [a["s_max"]["mean"] for a in attacks]
        errors = [a["s_max"]["std"] or 0.0 for a in attacks]
        colours = ["tab:green" if name == CLEAN_ATTACK else "tab:red" for name in names]
        shown = [i for i, mean in enumerate(means) if mean is not None]
        ax.bar(shown, [means[i] for i in shown], yerr=[errors[i] for i in shown],
               color=[colours[i] for i in shown], capsize=3)
        for i in sorted(set(range(len(names))) - set(shown)):
            ax.text(i, 0.05, "unscannable", rotation=90, ha="center", va="bottom", fontsize="small",
                    transform=ax.get_xaxis_transform())
        if g["model_level"]["k"] is not None:
            ax.axhline(g["model_level"]["k"], linestyle="--", color="black", linewidth=1, label=f"k = {g['model_level']['k']:g}")
            ax.legend(fontsize="small")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set(title=g["label"], ylabel="mean s_max")
    figure.savefig(path, dpi=120)
    return True
