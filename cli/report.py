"""Run reports: per-round curves as PNG plots (matplotlib) and a short markdown summary.

One neutral record (`RunRecord`) is drawn the same way whether it comes from a coordinator's
records over the control API (`pf2lora run report`, the demo) or from an in-process simulation
(`pf2lora simulate --plot`). What each source can give differs and the report says so: a
federation evaluates the silos once, after its last round, while a simulation evaluates every
`eval_every` rounds; a federation reports each round's mean training metrics over its silos,
a simulation every client's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

logger = logging.getLogger(__name__)

# Metric pairs of a final evaluation, in order of preference: (personalised, shared-only, label,
# higher is better).
EVAL_METRICS = (
    ("personal_accuracy", "shared_accuracy", "accuracy", True),
    ("personal_answer_loss", "shared_answer_loss", "answer loss", False),
    ("personal_mse", "shared_mse", "test MSE", False),
)


@dataclass(frozen=True)
class RoundPoint:
    """One completed round. Lists are per silo (empty where the source gives only means)."""

    round: int
    train_loss: float | None = None
    silo_train_loss: Mapping[str, float] = field(default_factory=dict)
    participants: int = 0
    reported: int = 0
    dropped: int = 0
    seconds: float | None = None  # the round's wall time
    # Local training in the round: the mean over the silos of a federation (they train at the
    # same time), the sum over the clients of a simulation (they train one after another).
    train_seconds: float | None = None
    # Evaluation after this round, per silo: {silo: {metric: value}} (simulation only).
    evaluation: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class RunRecord:
    """What a report draws: the rounds, the final per-silo evaluation and, for the synthetic
    rank experiment, each silo's singular values and true rank."""

    title: str
    source: str  # "federation" or "simulation"
    algorithm: str
    rounds: tuple[RoundPoint, ...]
    final: Mapping[str, Mapping[str, float]]
    spectra: Mapping[str, tuple[Sequence[float], int | None]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def eval_metric(final: Mapping[str, Mapping[str, float]]) -> tuple[str, str, str, bool] | None:
    """The first metric pair of the final evaluation that some silo reported (a silo may
    withhold its metrics: `[silo] report_metrics = false`)."""
    for personal, shared, label, higher in EVAL_METRICS:
        if any(personal in m for m in final.values()):
            return personal, shared, label, higher
    return None


def from_status(status: Any) -> RunRecord:
    """A RunRecord from a coordinator's RunStatus (control API)."""
    import json

    cfg = json.loads(status.config_json) if status.config_json else {}
    rounds = []
    for h in status.history:
        m = dict(h.mean_metrics)
        seconds = (h.completed_unix_ms - h.opened_unix_ms) / 1000 if h.completed_unix_ms else None
        rounds.append(
            RoundPoint(
                round=h.round,
                train_loss=m.get("train_loss"),
                participants=len(h.participants),
                reported=len(h.reported),
                dropped=len(h.dropped),
                seconds=seconds,
                train_seconds=m.get("train_seconds"),
            )
        )
    final = {e.silo_id: dict(e.metrics) for e in status.evaluation if e.kind == "evaluate"}
    algorithm = cfg.get("algorithm", {}).get("name", "?")
    return RunRecord(
        title=f"run {status.run_id}",
        source="federation",
        algorithm=algorithm,
        rounds=tuple(rounds),
        final=final,
        notes=(
            "A federation evaluates each silo once, after the last round; the training curves "
            "are the means over the silos that reported each round.",
        ),
    )


def from_simulation(result: Any, title: str = "simulation") -> RunRecord:
    """A RunRecord from `common.simulation.run_simulation`'s result."""
    names = [c["name"] for c in result.clients]
    rounds = []
    for r in result.rounds:
        if r["round"] == 0:
            continue
        losses = r.get("train_loss", [])
        secs = r.get("train_seconds", [])
        evaluation = {n: dict(e) for n, e in zip(names, r.get("eval", []), strict=False)}
        rounds.append(
            RoundPoint(
                round=r["round"],
                train_loss=sum(losses) / len(losses) if losses else None,
                silo_train_loss=dict(zip(names, losses, strict=False)),
                participants=len(names),
                reported=len(names),
                seconds=r.get("seconds"),
                train_seconds=sum(secs) if secs else None,
                evaluation=evaluation,
            )
        )
    final = {c["name"]: {k: v for k, v in c.items() if _is_number(v)} for c in result.clients}
    spectra = {
        c["name"]: (list(c["singular_values"]), c.get("true_rank"))
        for c in result.clients
        if "singular_values" in c
    }
    return RunRecord(
        title=title,
        source="simulation",
        algorithm=result.config.get("algorithm", {}).get("name", "?"),
        rounds=tuple(rounds),
        final=final,
        spectra=spectra,
        notes=("Local training seconds are summed over the clients, which run one by one.",),
    )


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def write_report(record: RunRecord, out: Path) -> list[Path]:
    """Draw the record's plots and report.md into `out` (created); the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    out.mkdir(parents=True, exist_ok=True)
    written = [
        p
        for p in (
            _plot_loss(record, out / "training_loss.png"),
            _plot_evaluation(record, out / "evaluation.png"),
            _plot_participants(record, out / "participants.png"),
            _plot_round_time(record, out / "round_time.png"),
            _plot_spectra(record, out / "singular_values.png"),
        )
        if p is not None
    ]
    md = out / "report.md"
    md.write_text(summary_markdown(record, [p.name for p in written]))
    logger.info("report written to %s", md)
    return [*written, md]


def _figure(title: str) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_loss(record: RunRecord, path: Path) -> Path | None:
    points = [r for r in record.rounds if r.train_loss is not None]
    if not points:
        return None
    fig, ax = _figure(f"{record.title}: training loss ({record.algorithm})")
    silos = sorted({s for r in points for s in r.silo_train_loss})
    for s in silos:
        xs = [r.round for r in points if s in r.silo_train_loss]
        ax.plot(
            xs, [r.silo_train_loss[s] for r in points if s in r.silo_train_loss], alpha=0.5, label=s
        )
    ax.plot(
        [r.round for r in points],
        [r.train_loss for r in points],
        color="black",
        linewidth=2,
        marker="o" if len(points) < 30 else None,
        label="mean over silos",
    )
    ax.set_xlabel("round")
    ax.set_ylabel("training loss (upper level)")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _plot_evaluation(record: RunRecord, path: Path) -> Path | None:
    metric = eval_metric(record.final)
    if metric is None:
        return None
    personal, shared, label, _ = metric
    final = {s: m for s, m in record.final.items() if personal in m}
    curve = [r for r in record.rounds if r.evaluation]
    if len(curve) >= 2:  # a curve per silo: personalised solid, shared-only dashed
        fig, ax = _figure(f"{record.title}: {label} per silo")
        import matplotlib.pyplot as plt

        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, s in enumerate(sorted(final)):
            c = colours[i % len(colours)]
            pts = [(r.round, r.evaluation[s]) for r in curve if s in r.evaluation]
            ax.plot(
                [x for x, m in pts if personal in m],
                [m[personal] for _, m in pts if personal in m],
                color=c,
                label=f"{s} personalised",
            )
            ax.plot(
                [x for x, m in pts if shared in m],
                [m[shared] for _, m in pts if shared in m],
                color=c,
                linestyle="--",
                label=f"{s} shared-only",
            )
        ax.set_xlabel("round")
    else:  # the final evaluation: a pair of bars per silo
        fig, ax = _figure(f"{record.title}: final {label} per silo")
        silos = sorted(final)
        xs = range(len(silos))
        ax.bar(
            [x - 0.2 for x in xs],
            [final[s][personal] for s in silos],
            width=0.4,
            label="personalised",
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [final[s].get(shared, float("nan")) for s in silos],
            width=0.4,
            label="shared-only",
        )
        ax.set_xticks(list(xs), silos, rotation=20, fontsize=8)
    ax.set_ylabel(label)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _plot_participants(record: RunRecord, path: Path) -> Path | None:
    if record.source != "federation" or not record.rounds:
        return None
    fig, ax = _figure(f"{record.title}: silos per round")
    xs = [r.round for r in record.rounds]
    ax.bar(xs, [r.reported for r in record.rounds], label="update in the aggregate")
    ax.bar(
        xs,
        [r.dropped for r in record.rounds],
        bottom=[r.reported for r in record.rounds],
        label="dropped after sharing keys",
    )
    ax.plot(
        xs,
        [r.participants for r in record.rounds],
        color="black",
        marker="_",
        linestyle="",
        markersize=14,
        label="enrolled",
    )
    ax.set_xlabel("round")
    ax.set_ylabel("silos")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _plot_round_time(record: RunRecord, path: Path) -> Path | None:
    points = [r for r in record.rounds if r.seconds is not None]
    if not points:
        return None
    fig, ax = _figure(f"{record.title}: round time")
    xs = [r.round for r in points]
    train = [min(r.train_seconds or 0.0, r.seconds or 0.0) for r in points]
    system = [(r.seconds or 0.0) - t for r, t in zip(points, train, strict=True)]
    federation = record.source == "federation"
    ax.bar(
        xs,
        train,
        label="local training (mean over silos)" if federation else "local training (all clients)",
    )
    ax.bar(
        xs,
        system,
        bottom=train,
        label="everything else (transfers, secure aggregation, waiting)"
        if federation
        else "everything else (aggregation, evaluation)",
    )
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _plot_spectra(record: RunRecord, path: Path) -> Path | None:
    if not record.spectra:
        return None
    fig, ax = _figure(f"{record.title}: singular values of each client's update")
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (s, (values, true_rank)) in enumerate(sorted(record.spectra.items())):
        c = colours[i % len(colours)]
        ks = range(1, len(values) + 1)
        ax.semilogy(
            ks,
            [max(v, 1e-12) for v in values],
            marker="o",
            markersize=3,
            color=c,
            label=f"{s} (true rank {true_rank})",
        )
        if true_rank:
            ax.axvline(true_rank + 0.5, color=c, linestyle=":", alpha=0.7)
    ranks = [r for _, r in record.spectra.values() if r]
    if ranks:  # the tail beyond the adapters' rank is numerical noise
        ax.set_xlim(0.5, min(max(len(v) for v, _ in record.spectra.values()), max(ranks) + 6) + 0.5)
    ax.set_xlabel("index k (dotted: between the true rank and the next)")
    ax.set_ylabel("singular value σ_k of ΔW")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _cell(v: float | None, fmt: str = ".4f", bold: bool = False) -> str:
    if v is None:
        return "-"
    text = format(v, fmt)
    return f"**{text}**" if bold else text


def summary_markdown(record: RunRecord, images: Sequence[str]) -> str:
    lines = [f"# {record.title}", "", f"Algorithm `{record.algorithm}`, {record.source}."]
    if record.rounds:
        secs = [r.seconds for r in record.rounds if r.seconds is not None]
        trains = [r.train_seconds for r in record.rounds if r.train_seconds is not None]
        text = f"{len(record.rounds)} rounds"
        if secs:
            text += f", {sum(secs):.1f} s in rounds (median {median(secs):.1f} s per round"
            text += f", of which local training {median(trains):.1f} s)" if trains else ")"
        lines.append(text + ".")
        first, last = record.rounds[0], record.rounds[-1]
        if first.train_loss is not None and last.train_loss is not None:
            lines.append(
                f"Training loss (mean over silos): {first.train_loss:.4f} in round "
                f"{first.round}, {last.train_loss:.4f} in round {last.round}."
            )
    metric = eval_metric(record.final)
    if metric is None:
        lines += ["", "No final evaluation was reported."]
    else:
        personal, shared, label, higher = metric
        final = {s: m for s, m in record.final.items() if personal in m}
        lines += ["", f"## Final {label} per silo", ""]
        lines += ["| silo | personalised | shared-only | difference |", "|---|---:|---:|---:|"]
        pairs = [(final[s][personal], final[s].get(shared)) for s in sorted(final)]
        for s, (p, q) in zip(sorted(final), pairs, strict=True):
            diff = None if q is None else p - q
            lines.append(f"| {s} | {_cell(p)} | {_cell(q)} | {_cell(diff, '+.4f')} |")
        mean_p = sum(p for p, _ in pairs) / len(pairs)
        shared_all = [q for _, q in pairs if q is not None]
        mean_s = sum(shared_all) / len(shared_all) if len(shared_all) == len(pairs) else None
        diff = None if mean_s is None else mean_p - mean_s
        lines.append(
            f"| **mean** | {_cell(mean_p, bold=True)} | {_cell(mean_s, bold=True)} | "
            f"{_cell(diff, '+.4f', bold=True)} |"
        )
        worst = min(p for p, _ in pairs) if higher else max(p for p, _ in pairs)
        better = "higher" if higher else "lower"
        lines += ["", f"Worst silo's personalised {label}: {worst:.4f} ({better} is better)."]
        withheld = sorted(set(record.final) - set(final))
        if withheld:
            lines += ["", f"Kept their metrics on the silo: {', '.join(withheld)}."]
    if record.spectra:
        lines += ["", "## Singular values", "", "Each client's ΔW spectrum against its true rank."]
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    lines += ["", *record.notes, ""]
    return "\n".join(lines)
