"""The personalisation benchmark's documents: personalization.json (every table run), the
markdown table a user decides with, the selection record, and accuracy-against-round plots."""

from __future__ import annotations

import datetime as dt
import json
import statistics
from pathlib import Path
from typing import Any

from _common import machine_info, save_results

SELECTION_LOG = "personalization_selection.jsonl"
RUN_LOG = "personalization_runs.jsonl"
BASELINE_ORDER = (
    "pf2lora-first-order",
    "joint",
    "homlora",
    "hetlora",
    "perfedavg",
    "fedsa",
    "local",
)


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
    return out


def _ms(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def table_markdown(
    runs: list[dict[str, Any]], choice: dict[str, Any], s: dict[str, Any], command: str
) -> str:
    lines = [
        "# Personalisation: PF2LoRA against every baseline",
        "",
        f"Command: `{command}`. Settings: {s['model']}, r = {s['shared_rank']}, "
        f"r̂ = {s['private_rank']}, {s['clients']} clients, {s['rounds']} rounds x "
        f"{s['local_steps']} local steps, batch {s['batch_size']}; each method on the settings "
        "it chose on validation data (personalization_selection.md). Accuracy in % on each "
        "client's own held-out split, mean ± sd over seeds of the mean over clients; worst = "
        "the lowest client's accuracy (mean over seeds); Δ = PF2LoRA minus the method, paired "
        "by seed (positive: PF2LoRA better); most a client loses = the largest (shared-only "
        "minus personalised) over the clients of a run, mean ± sd over seeds (0 or less: no "
        "client's personalised model is below its shared-only one); s/round = one silo's local "
        "training seconds per round, median over seeds (some runs shared the 2 cores with "
        "other jobs); sent = parameters each silo sends per round.",
        "",
    ]
    splits = sorted({r["split"] for r in runs})
    for split in splits:
        here = [r for r in runs if r["split"] == split]
        methods = [m for m in ("pf2lora", *BASELINE_ORDER) if any(r["method"] == m for r in here)]
        seeds = sorted({r["seed"] for r in here})
        lines += [
            f"## {split} ({len(seeds)} seed(s): {seeds})",
            "",
            "| method | personalised | shared-only | worst client | Δ vs PF2LoRA (paired) "
            "| most a client loses to its shared-only (points) | s/round | sent |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        pf2 = {r["seed"]: r for r in here if r["method"] == "pf2lora"}
        for m in methods:
            rs = sorted((r for r in here if r["method"] == m), key=lambda r: r["seed"])
            pers = [r["personalised_acc"] for r in rs]
            shared = [r["shared_acc"] for r in rs if r["shared_acc"] is not None]
            worst = [r["worst_client_acc"] for r in rs]
            deltas = [
                pf2[r["seed"]]["personalised_acc"] - r["personalised_acc"]
                for r in rs
                if r["seed"] in pf2 and m != "pf2lora"
            ]
            drops = []
            for r in rs:
                gaps = [
                    (v["shared_acc"] - v["personalised_acc"])
                    for v in r["per_client"].values()
                    if v["shared_acc"] is not None
                ]
                if gaps:
                    drops.append(max(gaps))
            sec = statistics.median(r["seconds_per_round"] for r in rs)
            sent = rs[0]["parameters"]["communicated_per_client"]
            lines.append(
                f"| {m} | {_ms(pers)} | {_ms(shared)} | {_ms(worst)} | "
                f"{_ms(deltas) if deltas else '-'} | {_ms(drops) if drops else '-'} | "
                f"{sec:.1f} | {sent:,} |"
            )
        lines += ["", f"![{split}](personalization_{_slug(split)}.png)", ""]
    lines += ["Selected settings:", ""]
    lines += [f"- {m}: `{json.dumps(hp, sort_keys=True)}`" for m, hp in sorted(choice.items())]
    return "\n".join(lines) + "\n"


def selection_markdown(
    recs: list[dict[str, Any]],
    choice: dict[str, Any],
    fixed: dict[str, dict[str, Any]],
    tuning_splits: list[str],
) -> str:
    other = sorted({r["split"] for r in recs} - set(tuning_splits))
    lines = [
        "# Personalisation benchmark: the selection record",
        "",
        "Every configuration tried, validation accuracy (% of 20% of each client's training "
        "data held out, stratified; the test split is not used) per tuning split and their "
        "mean; the chosen one is marked. Every method had the same budget of six "
        "configurations; PF2LoRA's six vary one open choice at a time around its base.",
        "",
    ]
    if other:
        lines += [
            f"Columns marked *(not used)* ({', '.join(other)}) are runs made before the "
            "selection was narrowed to the tuning split(s); they are shown, not counted.",
            "",
        ]
    splits = list(tuning_splits) + other
    names = list(tuning_splits) + [f"{sp} *(not used)*" for sp in other]
    lines += [
        "| method | configuration | " + " | ".join(names) + " | mean | chosen |",
        "|---|---|" + "---:|" * (len(splits) + 1) + "---|",
    ]
    by_cfg: dict[tuple[str, str], dict[str, float | None]] = {}
    for r in recs:  # a diverged run has no accuracy: shown as "diverged", counted as 0
        k = (r["method"], json.dumps(r["config"], sort_keys=True))
        by_cfg.setdefault(k, {})[r["split"]] = r["personalised_acc"]
    for (m, cfg), accs in sorted(by_cfg.items()):
        counted = [accs[sp] or 0.0 for sp in tuning_splits if sp in accs]
        mean = _pct(statistics.fmean(counted)) if len(counted) == len(tuning_splits) else "-"
        chosen = m in choice and json.dumps({**fixed[m], **choice[m]}, sort_keys=True) == cfg
        cells = " | ".join(
            "diverged" if sp in accs and accs[sp] is None else _pct(accs.get(sp)) for sp in splits
        )
        lines.append(f"| {m} | `{cfg}` | {cells} | {mean} | {'**yes**' if chosen else ''} |")
    return "\n".join(lines) + "\n"


def _slug(split: str) -> str:
    return split.replace("/", "_").replace("=", "")


def plot_curves(runs: list[dict[str, Any]], out: Path) -> list[str]:
    """One PNG per split: mean personalised accuracy (over seeds) against round, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for split in sorted({r["split"] for r in runs}):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in ("pf2lora", *BASELINE_ORDER):
            rs = [r for r in runs if r["split"] == split and r["method"] == m]
            if not rs:
                continue
            rounds = [c[0] for c in rs[0]["curve"]]
            ys = [statistics.fmean(r["curve"][i][1] for r in rs) for i in range(len(rounds))]
            ax.plot(
                rounds,
                [100 * y for y in ys],
                marker="o",
                ms=3,
                label=m,
                lw=2.5 if m == "pf2lora" else 1.2,
            )
        ax.set_xlabel("round")
        ax.set_ylabel("mean personalised accuracy (%)")
        ax.set_title(f"{split}: {len({r['seed'] for r in runs if r['split'] == split})} seed(s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        name = f"personalization_{_slug(split)}.png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def write_report(
    out: Path,
    s: dict[str, Any],
    choice: dict[str, Any],
    command: str,
    fixed: dict[str, dict[str, Any]],
) -> None:
    selection = [r for r in _read(out / SELECTION_LOG) if r["phase"] == "tune"]
    table = [r for r in _read(out / RUN_LOG) if r["phase"] == "table"]
    runs = [r for r in table if not r.get("diverged")]
    diverged = [r for r in table if r.get("diverged")]
    if selection:
        (out / "personalization_selection.md").write_text(
            selection_markdown(selection, choice, fixed, s["tuning_splits"])
        )
    if not runs:
        return
    fields = (
        "dataset",
        "split",
        "algorithm",
        "method",
        "config",
        "seed",
        "rounds",
        "local_steps",
        "clients",
        "personalised_acc",
        "shared_acc",
        "worst_client_acc",
        "per_client",
        "seconds_per_round",
        "curve",
        "parameters",
    )
    doc = {
        "config": {
            **s,
            "selected": choice,
            "command": command,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": machine_info(),
        },
        "runs": [{k: r[k] for k in fields} for r in runs],
        "diverged": [
            {k: r[k] for k in ("split", "method", "config", "seed", "diverged")} for r in diverged
        ],
    }
    shown, partial = complete_seeds(table)
    md = table_markdown([r for r in runs if (r["split"], r["seed"]) in shown], choice, s, command)
    if partial:
        md += "\nSeeds not every method has finished yet (in the JSON, not in the tables):\n\n"
        md += "".join(f"- {split} seed {seed}: {what}\n" for (split, seed), what in partial)
    if diverged:
        md += "\nRuns that diverged (local training stopped; not in the table above):\n\n"
        md += "".join(
            f"- {r['split']} {r['method']} seed {r['seed']}: {r['diverged']}\n" for r in diverged
        )
    save_results(out, "personalization", doc, md)
    plot_curves([r for r in runs if (r["split"], r["seed"]) in shown], out)


def complete_seeds(
    table: list[dict[str, Any]],
) -> tuple[set[tuple[str, int]], list[tuple[tuple[str, int], str]]]:
    """(split, seed) pairs every method of the split has a run for (diverged runs count), and
    the others with the methods they have so far: a seed still running is kept out of the
    means so that no method's row mixes other seeds than the rest."""
    methods: dict[str, set[str]] = {}
    have: dict[tuple[str, int], set[str]] = {}
    for r in table:
        methods.setdefault(r["split"], set()).add(r["method"])
        have.setdefault((r["split"], r["seed"]), set()).add(r["method"])
    shown = {k for k, ms in have.items() if ms == methods[k[0]]}
    partial = [
        (k, f"{len(ms)} of {len(methods[k[0]])} methods ({', '.join(sorted(ms))})")
        for k, ms in sorted(have.items())
        if k not in shown
    ]
    return shown, partial
