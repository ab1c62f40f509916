"""Report of `fedvec bench quality`: turns the runner's measurements into files.

`write_report(out_dir, data)` writes results.csv (every measurement), summary.json (the
numbers of the report tables), report.md (tables, a short data-driven reading, the plots)
and four PNG plots. It is a pure function of `QualityData`: no service, model or database.

Conventions: accuracies are fractions in [0, 1]; "mean ± std" is over seeds, where each
seed first averages over clients (or tasks, or pairs); std is the *sample* standard
deviation (ddof = 1), undefined (null in summary.json, omitted in report.md) with one seed.
Final metrics use each (strategy, seed)'s last round present in its personalized rows.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COLUMNS = (
    "seed",
    "strategy",
    "round",
    "client",
    "task",
    "eval_task",
    "kind",
    "accuracy",
    "balanced_accuracy",
    "examples",
)
# may be empty: generation tasks have no balanced accuracy, older runs did not measure it
OPTIONAL = ("balanced_accuracy",)
KINDS = ("personalized", "generalization", "global", "new_client")
STD_KIND = "sample standard deviation over seeds (ddof=1); null with a single seed"

# Table 1 columns: summary key, markdown header.
TABLE1 = (
    ("personalized", "personalized"),
    ("personalized_balanced", "personalized balanced accuracy"),
    ("personalized_weighted", "personalized (example-weighted)"),
    ("generalization", "generalization (other tasks)"),
    ("global", "global adapter"),
    ("new_client", "new client"),
)
GROUPING_STRATEGIES = ("fedbip", "fedbip_relative", "fedbip_layerwise", "clustered")
PLOTS = {
    "accuracy_per_task": "accuracy_per_task.png",
    "accuracy_vs_round": "accuracy_vs_round.png",
    "similarity_heatmaps": "similarity_heatmaps.png",
    "groups_over_rounds": "groups_over_rounds.png",
}
DPI = 150


@dataclass
class QualityData:
    """What the quality benchmark runner collected (see the module docstring of
    services/bench/quality.py for how each part is measured)."""

    rows: list[dict]  # one per measurement, keys COLUMNS
    similarity: dict  # clients, tasks, task_vector, raw, strategy, seed, round
    groups: dict  # {strategy: [{client: group index} for round 1..R]} (seed 0)
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- statistics


def _stat(values: list[float]) -> dict[str, Any] | None:
    """Mean and sample std of per-seed values; None when there is nothing to average."""
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def _mean(values: Iterable[float]) -> float:
    return statistics.fmean(list(values))


def _validate(rows: list[dict]) -> list[dict]:
    clean = []
    for i, row in enumerate(rows):
        missing = [c for c in COLUMNS if c not in row and c not in OPTIONAL]
        if missing:
            raise ValueError(f"row {i} lacks {missing}: {row}")
        if row["kind"] not in KINDS:
            raise ValueError(f"row {i}: unknown kind {row['kind']!r} (known: {KINDS})")
        clean.append(
            {
                "seed": int(row["seed"]),
                "strategy": str(row["strategy"]),
                "round": int(row["round"]),
                "client": str(row["client"]),
                "task": str(row["task"]),
                "eval_task": str(row["eval_task"]),
                "kind": str(row["kind"]),
                "accuracy": float(row["accuracy"]),
                "balanced_accuracy": _optional_float(row.get("balanced_accuracy")),
                "examples": int(row["examples"]),
            }
        )
    return clean


def _optional_float(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def _order(preferred: Iterable[str], present: Iterable[str]) -> list[str]:
    """`preferred` first (those present or not), then the rest of `present`, sorted."""
    out = list(dict.fromkeys(preferred))
    return out + sorted(set(present) - set(out))


def _final_round(rows: list[dict]) -> dict[tuple[str, int], int]:
    last: dict[tuple[str, int], int] = {}
    for r in rows:
        if r["kind"] == "personalized":
            key = (r["strategy"], r["seed"])
            last[key] = max(last.get(key, 0), r["round"])
    return last


def compute_summary(data: QualityData) -> dict[str, Any]:
    """The numbers of the report (JSON-serializable)."""
    rows = _validate(data.rows)
    meta = data.meta or {}
    strategies = _order(meta.get("strategies", []), (r["strategy"] for r in rows))
    seeds = sorted({r["seed"] for r in rows} | set(meta.get("seeds", [])))
    sim_tasks = (data.similarity or {}).get("tasks", [])
    tasks = _order(sim_tasks, (r["eval_task"] for r in rows if r["kind"] == "personalized"))
    final = _final_round(rows)

    # per (strategy, seed): the rows each Table 1 column averages
    by: dict[tuple[str, int, str], list[dict]] = defaultdict(list)
    for r in rows:
        key = (r["strategy"], r["seed"])
        if r["kind"] == "personalized":
            if r["round"] == final[key]:
                by[(*key, "personalized")].append(r)
        else:
            by[(*key, r["kind"])].append(r)

    def per_seed(strategy: str, column: str) -> list[float]:
        values = []
        for seed in seeds:
            kind = "personalized" if column.startswith("personalized") else column
            group = by.get((strategy, seed, kind))
            if not group:
                continue
            if column == "personalized_weighted":
                total = sum(r["examples"] for r in group)
                if total <= 0:
                    continue
                values.append(sum(r["accuracy"] * r["examples"] for r in group) / total)
            elif column in ("personalized", "personalized_balanced"):
                # one value per client, even if a client was scored twice
                metric = "accuracy" if column == "personalized" else "balanced_accuracy"
                per_client: dict[str, list[float]] = defaultdict(list)
                for r in group:
                    if r[metric] is not None:
                        per_client[r["client"]].append(r[metric])
                if per_client:
                    values.append(_mean(_mean(v) for v in per_client.values()))
            else:
                values.append(_mean(r["accuracy"] for r in group))
        return values

    table1 = {s: {col: _stat(per_seed(s, col)) for col, _ in TABLE1} for s in strategies}
    best = {col: _best({s: table1[s][col] for s in strategies}) for col, _ in TABLE1}

    def per_task(metric: str) -> dict[str, dict[str, Any]]:
        table: dict[str, dict[str, Any]] = {}
        for task in tasks:
            table[task] = {}
            for s in strategies:
                values = []
                for seed in seeds:
                    got = [
                        r[metric]
                        for r in by.get((s, seed, "personalized"), [])
                        if r["eval_task"] == task and r[metric] is not None
                    ]
                    if got:
                        values.append(_mean(got))
                table[task][s] = _stat(values)
        return table

    table2 = per_task("accuracy")
    table2_balanced = per_task("balanced_accuracy")
    best_per_task = {task: _best(table2[task]) for task in tasks}

    rounds: dict[str, dict[str, list]] = {}
    for s in strategies:
        acc: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r["strategy"] == s and r["kind"] == "personalized":
                acc[r["round"]][r["seed"]].append(r["accuracy"])
        if not acc:
            continue
        stats = [_stat([_mean(v) for _, v in sorted(acc[k].items())]) for k in sorted(acc)]
        rounds[s] = {
            "round": sorted(acc),
            "mean": [st["mean"] for st in stats],
            "std": [st["std"] for st in stats],
            "n": [st["n"] for st in stats],
        }

    summary: dict[str, Any] = {
        "std": STD_KIND,
        "strategies": strategies,
        "seeds": seeds,
        "tasks": tasks,
        "final_round": {f"{s}/{seed}": k for (s, seed), k in sorted(final.items())},
        "table1": table1,
        "best": best,
        "table2": table2,
        "best_per_task": best_per_task,
        "table2_balanced": table2_balanced,
        "best_per_task_balanced": {task: _best(table2_balanced[task]) for task in tasks},
        "rounds": rounds,
        "similarity": _similarity_summary(data.similarity),
        "groups": _groups_summary(data.groups, data.similarity),
    }
    summary["reading"] = _reading(summary)
    return summary


def _best(cells: dict[str, dict | None]) -> list[str]:
    """The strategies with the highest mean (ties all count); [] when no cell has a value."""
    present = {s: c["mean"] for s, c in cells.items() if c is not None}
    if not present:
        return []
    top = max(present.values())
    return [s for s, m in present.items() if math.isclose(m, top, rel_tol=0, abs_tol=1e-12)]


def _offdiag(matrix: list[list[float]]) -> list[float]:
    return [v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j]


def _similarity_summary(sim: dict) -> dict[str, Any] | None:
    if not sim or not sim.get("clients"):
        return None
    out: dict[str, Any] = {k: sim.get(k) for k in ("strategy", "seed", "round")}
    tasks = sim.get("tasks") or [""] * len(sim["clients"])
    for name in ("raw", "task_vector"):
        matrix = sim.get(name)
        off = _offdiag(matrix) if matrix else []
        if not off:
            out[name] = None
            continue
        cell: dict[str, Any] = {"offdiag_mean": _mean(off), "min": min(off), "max": max(off)}
        # where several clients share a task (the demo's families), same vs different task
        same = [
            v
            for i, row in enumerate(matrix)
            for j, v in enumerate(row)
            if i != j and tasks[i] == tasks[j]
        ]
        diff = [
            v
            for i, row in enumerate(matrix)
            for j, v in enumerate(row)
            if i != j and tasks[i] != tasks[j]
        ]
        if same and diff:
            cell["same_task_mean"] = _mean(same)
            cell["different_task_mean"] = _mean(diff)
        out[name] = cell
    return out


def _relabel(rounds: list[dict[str, int]], clients: list[str]) -> list[dict[str, int]]:
    """Renumber each round's groups so a group keeps the label of the previous round's group
    it overlaps most (greedy); new groups take the smallest free label. Makes colours stable."""
    rank = {c: i for i, c in enumerate(clients)}
    out: list[dict[str, int]] = []
    prev: dict[int, set[str]] = {}
    for assign in rounds:
        members: dict[int, set[str]] = defaultdict(set)
        for client, g in assign.items():
            members[int(g)].add(client)
        pairs = sorted(
            ((len(m & pm), g, label) for g, m in members.items() for label, pm in prev.items()),
            key=lambda t: (-t[0], t[1], t[2]),
        )
        mapping: dict[int, int] = {}
        for overlap, g, label in pairs:
            if overlap and g not in mapping and label not in mapping.values():
                mapping[g] = label
        # unmatched groups in order of their first client, so round 1 reads 0, 1, 2 ...
        for g in sorted(members, key=lambda g: min(rank.get(c, len(rank)) for c in members[g])):
            if g not in mapping:
                label = 0
                while label in mapping.values():
                    label += 1
                mapping[g] = label
        out.append({c: mapping[int(g)] for c, g in assign.items()})
        prev = {mapping[g]: m for g, m in members.items()}
    return out


def _groups_summary(groups: dict, sim: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for strategy, rounds in (groups or {}).items():
        if not any(rounds or []):
            continue  # nothing to draw for a strategy that never grouped anyone
        clients = _order((sim or {}).get("clients", []), (c for r in rounds for c in r))
        clients = [c for c in clients if any(c in r for r in rounds)]
        relabelled = _relabel(rounds, clients)
        last = relabelled[-1]
        final: dict[int, list[str]] = defaultdict(list)
        for c in clients:
            if c in last:
                final[last[c]].append(c)
        out[strategy] = {
            "clients": clients,
            "relabelled": relabelled,
            "final_groups": [final[k] for k in sorted(final)],
        }
    return out


# --------------------------------------------------------------------------- text


def _points(a: float, b: float) -> str:
    return f"{(a - b) * 100:+.1f}"


def _fmt(cell: dict | None, bold: bool = False) -> str:
    if cell is None:
        return "–"
    text = (
        f"{cell['mean']:.3f}" if cell["std"] is None else f"{cell['mean']:.3f} ± {cell['std']:.3f}"
    )
    return f"**{text}**" if bold else text


def _paired(summary: dict, a: str, b: str, column: str = "personalized") -> str | None:
    """'a − b' in points, with the per-seed differences when there are several seeds."""
    t1 = summary["table1"]
    ca, cb = t1.get(a, {}).get(column), t1.get(b, {}).get(column)
    if ca is None or cb is None:
        return None
    text = f"{_points(ca['mean'], cb['mean'])} points"
    seeds = summary["seeds"]
    if ca["n"] == cb["n"] == len(seeds) > 1:
        diffs = ", ".join(_points(x, y) for x, y in zip(ca["values"], cb["values"], strict=True))
        text += f" (per seed: {diffs})"
    return text


def _reading(summary: dict) -> list[str]:
    """Plain sentences about the numbers; each only when its data are there."""
    t1 = summary["table1"]
    out: list[str] = []
    ranked = sorted(
        ((c["mean"], s) for s in t1 if (c := t1[s]["personalized"]) is not None), reverse=True
    )
    if ranked:
        (m0, s0), rest = ranked[0], ranked[1:]
        sentence = f"Highest mean personalized accuracy: {s0} ({m0:.3f})"
        if rest:
            sentence += f", then {rest[0][1]} ({rest[0][0]:.3f}); lowest: {ranked[-1][1]}"
            sentence += f" ({ranked[-1][0]:.3f})"
        out.append(sentence + ".")
    for main, other in (
        ("fedbip", "fedavg"),
        ("fedbip", "local"),
        ("fedbip_relative", "fedbip"),
        ("fedbip_relative", "local"),
    ):
        diff = _paired(summary, main, other)
        if diff is not None:
            out.append(f"{main} minus {other}, personalized accuracy: {diff}.")
    lw, fb = t1.get("fedbip_layerwise", {}), t1.get("fedbip", {})
    if lw.get("personalized") and fb.get("personalized"):
        d = lw["personalized"]["mean"] - fb["personalized"]["mean"]
        verdict = "at least as high as" if d >= 0 else "below"
        out.append(
            f"fedbip_layerwise is {verdict} fedbip on personalized accuracy "
            f"({_points(lw['personalized']['mean'], fb['personalized']['mean'])} points)."
        )
    for column, what in (
        ("generalization", "on the other clients' tasks (generalization)"),
        ("global", "with the global adapter"),
        ("new_client", "for the new client"),
    ):
        best = summary["best"][column]
        if best:
            cell = t1[best[0]][column]
            sentence = f"Best {what}: {', '.join(best)} ({cell['mean']:.3f})"
            if column == "new_client" and t1.get("local", {}).get(column) and best[0] != "local":
                local = t1["local"][column]["mean"]
                sentence += f", {_points(cell['mean'], local)} points over training it locally"
            out.append(sentence + ".")
    sim = summary["similarity"]
    if sim and sim.get("raw") and sim.get("task_vector"):
        raw, tv = sim["raw"], sim["task_vector"]
        sentence = (
            f"Mean off-diagonal cosine between clients: {raw['offdiag_mean']:.4f} on raw "
            f"parameters (range {raw['min']:.4f} to {raw['max']:.4f}) versus "
            f"{tv['offdiag_mean']:.3f} on task vectors (range {tv['min']:.3f} to {tv['max']:.3f})"
        )
        raw_spread, tv_spread = raw["max"] - raw["min"], tv["max"] - tv["min"]
        if tv_spread > 10 * raw_spread:
            sentence += "; raw parameters barely tell the clients apart, task vectors do"
        out.append(sentence + ".")
        if "same_task_mean" in tv:
            out.append(
                f"Task-vector cosine between clients of the same task averages "
                f"{tv['same_task_mean']:.3f}, between different tasks "
                f"{tv['different_task_mean']:.3f}."
            )
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _label(client: str, task: str) -> str:
    # flan8 client names already carry their task ("flan-1-snli")
    return client if not task or task in client else f"{client} ({task})"


def _z(z: Any) -> str:
    """A relative grouping threshold as the report names it (quality.NO_GROUPING_Z:
    beyond any similarity)."""
    try:
        value = float(z)
    except (TypeError, ValueError):
        return str(z)
    return "none (every client alone)" if value >= 1e5 else f"z={value:g}"


def _markdown(data: QualityData, summary: dict, plots: dict[str, str | None]) -> str:
    meta = data.meta or {}
    strategies = summary["strategies"]
    lines = [f"# fedvec quality benchmark — {meta.get('dataset', '?')}", ""]
    settings = meta.get("settings") or {}
    facts = [
        ("commit", f"`{meta.get('commit', '?')}`"),
        ("dataset", meta.get("dataset", "?")),
        ("seeds", ", ".join(str(s) for s in summary["seeds"])),
        ("rounds", meta.get("rounds", "?")),
        ("strategies", ", ".join(strategies)),
        ("clients", len((data.similarity or {}).get("clients", [])) or "?"),
        ("training examples per client", meta.get("train_per_client", "?")),
        ("test examples per client", meta.get("test_per_client", "?")),
        ("settings", ", ".join(f"`{k}={v}`" for k, v in settings.items()) or "–"),
        ("started", meta.get("started", "?")),
        ("duration", _duration(meta.get("duration_s"))),
        ("command", f"`{meta.get('command', '?')}`"),
    ]
    shown = {"commit", "dataset", "seeds", "rounds", "strategies", "settings", "started"}
    shown |= {"duration_s", "command", "train_per_client", "test_per_client", "reference"}
    shown |= {"adjusted_rand_index"}  # a section of its own
    new = meta.get("new_client")
    if isinstance(new, dict):
        text = f"{new.get('name', '?')} ({new.get('task', '?')})"
        if "examples" in new:
            text += f", {new['examples']} training examples, enrolled after the others trained"
        facts.insert(8, ("new client", text))
        shown.add("new_client")
    calibration = meta.get("calibration")
    if isinstance(calibration, dict):
        gains = ", ".join(
            f"{t} {g:+.3f}" for t, g in calibration.get("validation_gain_over_chance", {}).items()
        )
        aris = ", ".join(f"{_z(z)}: {a:.2f}" for z, a in calibration.get("ari_by_z", {}).items())
        facts.append(
            (
                "chosen on validation records (never the test split)",
                f"grouping threshold {_z(calibration.get('group_threshold_z'))} (adjusted Rand "
                f"index against the tasks, mean over rounds of local training: {aris}); the late "
                f"client's task {calibration.get('new_client_task')} (balanced accuracy over "
                f"chance after local training: {gains})",
            )
        )
        shown.add("calibration")
    for line in meta.get("left_out") or []:
        facts.append(("left out", line))
    shown.add("left_out")
    # whatever else the runner recorded, so the report never hides a setting
    facts += [(k.replace("_", " "), v) for k, v in meta.items() if k not in shown]
    lines += [f"- **{k}**: {v}" for k, v in facts]
    lines += [
        "",
        "Accuracy is a fraction in [0, 1]. Cells are mean ± std over seeds; std is the "
        "sample standard deviation (ddof = 1), left out with a single seed. Each seed first "
        "averages over clients (or tasks, or client/task pairs). Final metrics use each "
        "run's last round. Best value per column in bold; – = not measured.",
        "",
        "## Table 1 — per strategy",
        "",
        "| strategy | " + " | ".join(h for _, h in TABLE1) + " |",
        "| --- |" + " ---: |" * len(TABLE1),
    ]
    t1 = summary["table1"]
    for s in strategies:
        cells = [_fmt(t1[s][col], s in summary["best"][col]) for col, _ in TABLE1]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "- personalized: each client's personalized adapter on its own task's test split, "
        "mean over clients; example-weighted: weighted by test examples.",
        "- generalization: each client's final personalized adapter on the other clients' "
        "tasks, mean over (client, task) pairs.",
        "- global adapter: the example-weighted mean of the clients' latest task vectors on "
        "the initial adapter, mean over tasks.",
        "- new client: a client enrolled after the others trained, after its first round.",
        "",
        "## Table 2 — personalized accuracy per task",
        "",
    ]
    # what needs no learning, where the runner measured it (always the most frequent
    # answer; a random option): the level a strategy must beat to have learned anything
    reference = meta.get("reference") or {}
    ref_cols = [k for k in ("majority", "chance") if any(k in r for r in reference.values())]
    lines += [
        "| task | " + " | ".join(strategies + [f"*{k}*" for k in ref_cols]) + " |",
        "| --- |" + " ---: |" * (len(strategies) + len(ref_cols)),
    ]
    for task in summary["tasks"]:
        best = summary["best_per_task"][task]
        cells = [_fmt(summary["table2"][task][s], s in best) for s in strategies]
        ref = reference.get(task, {})
        cells += [f"*{ref[k]:.3f}*" if k in ref else "–" for k in ref_cols]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    if ref_cols:
        lines += [
            "",
            "*majority*: always picking the option at the most frequent answer position; "
            "*chance*: picking an option at random (expected accuracy). Neither needs "
            "training.",
        ]
    balanced = summary.get("table2_balanced") or {}
    if any(cell for task in balanced.values() for cell in task.values()):
        lines += [
            "",
            "## Table 3 — personalized balanced accuracy per task",
            "",
            "Mean recall over the gold answers (by answer position): always giving one "
            "answer scores 1/k on k answers however skewed the test split is, so a value "
            "above that is learning.",
            "",
            "| task | " + " | ".join(strategies) + " |",
            "| --- |" + " ---: |" * len(strategies),
        ]
        for task in summary["tasks"]:
            best = summary["best_per_task_balanced"][task]
            cells = [_fmt(balanced[task][s], s in best) for s in strategies]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "## Table 4 — personalized accuracy per seed", ""]
    seeds = summary["seeds"]
    lines += [
        "| strategy | " + " | ".join(f"seed {x}" for x in seeds) + " |",
        "| --- |" + " ---: |" * len(seeds),
    ]
    for s in strategies:
        cell = t1[s]["personalized"]
        values = (cell or {}).get("values") or []
        cells = [f"{v:.3f}" for v in values] if len(values) == len(seeds) else ["–"] * len(seeds)
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    rand = meta.get("adjusted_rand_index") or {}
    if rand:
        lines += [
            "",
            "## Groups against tasks — adjusted Rand index per round",
            "",
            "1: the groups are exactly the tasks; about 0: unrelated to them. Per seed, "
            "round 1 to the last.",
            "",
        ]
        for s, by_seed in rand.items():
            for seed, values in sorted(by_seed.items()):
                lines.append(f"- **{s}**, seed {seed}: " + ", ".join(f"{v:.2f}" for v in values))
        mixed = meta.get("mixed_groups_last_round") or {}
        if mixed:
            lines += ["", "Groups at the last round that hold more than one task:", ""]
            for s, by_seed in mixed.items():
                for seed, groups in sorted(by_seed.items()):
                    text = "; ".join(" + ".join(g) for g in groups) if groups else "none"
                    lines.append(f"- **{s}**, seed {seed}: {text}")
    lines += ["", "## Reading the numbers", ""]
    lines.append(" ".join(summary["reading"]) or "No personalized measurements.")
    groups = summary["groups"]
    if groups:
        tasks_of = dict(
            zip(data.similarity.get("clients", []), data.similarity.get("tasks", []), strict=False)
        )
        lines += ["", "## Final groups (seed 0)", ""]
        for s, g in groups.items():
            parts = [
                "{" + ", ".join(_label(c, tasks_of.get(c, "")) for c in members) + "}"
                for members in g["final_groups"]
            ]
            lines.append(f"- **{s}** ({len(parts)} groups): " + " ".join(parts))
    lines += ["", "## Plots", ""]
    captions = {
        "accuracy_per_task": "Personalized accuracy per task (final round; error bars: std "
        "over seeds).",
        "accuracy_vs_round": "Mean personalized accuracy per round (shaded: ± std over seeds).",
        "similarity_heatmaps": "Cosine similarity between clients: raw parameters versus task "
        "vectors, each panel on its own colour scale.",
        "groups_over_rounds": "Group of each client per round (seed 0); group numbers are "
        "relabelled so a group keeps its colour from round to round where it can.",
    }
    for key, caption in captions.items():
        name = plots.get(key)
        if name:
            lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
        else:
            lines += [f"*{PLOTS[key]}: not drawn — {summary['plots_skipped'][key]}.*", ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    # Figure without pyplot: no global backend switch, safe inside a long-running process.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _colours(strategies: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {s: palette[i % len(palette)] for i, s in enumerate(strategies)}


def _over_seeds(summary: dict) -> str:
    n = len(summary["seeds"])
    return f"mean ± std over {n} seeds" if n > 1 else "one seed"


def _plot_per_task(path: Path, summary: dict) -> None:
    strategies, tasks = summary["strategies"], summary["tasks"]
    colours = _colours(strategies)
    fig = _figure(max(7.0, 1.3 * len(tasks) + 3), 5.0)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(strategies))
    for k, s in enumerate(strategies):
        xs, means, stds = [], [], []
        for i, task in enumerate(tasks):
            cell = summary["table2"][task][s]
            if cell is not None:
                xs.append(i - 0.4 + width * (k + 0.5))
                means.append(cell["mean"])
                stds.append(cell["std"] or 0.0)
        spread = stds if len(summary["seeds"]) > 1 else None  # no error bars from one seed
        ax.bar(xs, means, width, yerr=spread, capsize=2, label=s, color=colours[s])
    ax.set_xticks(range(len(tasks)), tasks, rotation=25, ha="right")
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("task")
    ax.set_ylabel("personalized accuracy")
    ax.set_title(f"Personalized accuracy per task (final round, {_over_seeds(summary)})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="strategy", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    fig.savefig(path, dpi=DPI)


def _plot_vs_round(path: Path, summary: dict) -> None:
    colours = _colours(summary["strategies"])
    fig = _figure(8.0, 5.0)
    ax = fig.add_subplot()
    all_rounds: set[int] = set()
    for s in summary["strategies"]:
        curve = summary["rounds"].get(s)
        if not curve:
            continue
        x, m = curve["round"], curve["mean"]
        sd = [v or 0.0 for v in curve["std"]]
        all_rounds.update(x)
        ax.plot(x, m, marker="o", label=s, color=colours[s])
        lo = [a - b for a, b in zip(m, sd, strict=True)]
        hi = [a + b for a, b in zip(m, sd, strict=True)]
        ax.fill_between(x, lo, hi, color=colours[s], alpha=0.15, linewidth=0)
    ax.set_xticks(sorted(all_rounds))
    ax.set_xlabel("round")
    ax.set_ylabel("mean personalized accuracy")
    ax.set_title(f"Personalized accuracy vs round (mean over clients; {_over_seeds(summary)})")
    ax.grid(alpha=0.3)
    ax.legend(title="strategy", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    fig.savefig(path, dpi=DPI)


def _annotate(ax: Any, image: Any, values: Any, fmt: str) -> None:
    """Cell values in black or white, whichever reads on the cell's colour."""
    for (i, j), v in _cells(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        r, g, b, _ = image.cmap(image.norm(v))
        ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        text = format(v, fmt)
        if text.startswith("-") and float(text) == 0:
            text = text[1:]  # "-0.00" reads as a sign that is not there
        ax.text(j, i, text, ha="center", va="center", color=ink, fontsize=9)


def _cells(values: Any) -> Iterable[tuple[tuple[int, int], Any]]:
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            yield (i, j), v


def _plot_heatmaps(path: Path, sim: dict) -> None:
    import numpy as np

    clients, tasks = sim["clients"], sim.get("tasks") or [""] * len(sim["clients"])
    labels = [_label(c, t) for c, t in zip(clients, tasks, strict=True)]
    n = len(clients)
    # size from the content so the square matrices fill their panels: cells, tick labels
    # (about 0.065 in per character at 9 pt; the x labels slant at 40°), colour bar, titles
    matrix = max(2.0, 0.6 * n)
    label = 0.065 * max(len(x) for x in labels)
    fig = _figure(2 * (matrix + label + 1.1), matrix + 0.7 * label + 1.6)
    axes = fig.subplots(1, 2)
    panels = (("raw", "raw parameters"), ("task_vector", "task vectors"))
    for ax, (key, what) in zip(axes, panels, strict=True):
        m = np.asarray(sim[key], dtype=float)
        lo, hi = float(np.nanmin(m)), float(np.nanmax(m))
        if hi - lo < 1e-12:
            lo, hi = lo - 1e-6, hi + 1e-6
        image = ax.imshow(m, cmap="viridis", vmin=lo, vmax=hi)
        fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03, label="cosine")
        _annotate(ax, image, m.tolist(), ".2f")
        ax.set_title(f"Cosine of {what}\n(colour scale {lo:.4g} to {hi:.4g})")
        ax.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
        ax.set_yticks(range(n), labels, fontsize=9)
        ax.set_xlabel("client")
        ax.set_ylabel("client")
    where = ", ".join(f"{k} {sim[k]}" for k in ("strategy", "seed", "round") if k in sim)
    fig.suptitle(f"Client similarity ({where})" if where else "Client similarity")
    fig.savefig(path, dpi=DPI)


def _plot_groups(path: Path, groups: dict, sim: dict) -> None:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    tasks_of = dict(zip(sim.get("clients", []), sim.get("tasks", []), strict=False))
    strategies = list(groups)
    n_clients = max(len(g["clients"]) for g in groups.values())
    n_rounds = max(len(g["relabelled"]) for g in groups.values())
    n_labels = 1 + max(v for g in groups.values() for r in g["relabelled"] for v in r.values())
    palette = colormaps["tab20" if n_labels > 10 else "tab10"].colors
    cmap = ListedColormap([palette[i % len(palette)] for i in range(n_labels)]).with_extremes(
        bad="white"
    )
    panel_w = max(2.5, 0.45 * n_rounds + 1.2)
    label_w = 0.08 * max(
        len(_label(c, tasks_of.get(c, ""))) for g in groups.values() for c in g["clients"]
    )
    fig = _figure(panel_w * len(strategies) + label_w + 0.5, 0.45 * n_clients + 1.8)
    axes = fig.subplots(1, len(strategies), squeeze=False)[0]
    for k, (ax, s) in enumerate(zip(axes, strategies, strict=True)):
        g = groups[s]
        clients, rounds = g["clients"], g["relabelled"]
        m = np.full((len(clients), len(rounds)), np.nan)
        for j, assign in enumerate(rounds):
            for i, c in enumerate(clients):
                if c in assign:
                    m[i, j] = assign[c]
        image = ax.imshow(m, cmap=cmap, vmin=-0.5, vmax=n_labels - 0.5, aspect="auto")
        _annotate(ax, image, [[None if math.isnan(v) else int(v) for v in row] for row in m], "d")
        ax.set_title(s)
        ax.set_xticks(range(len(rounds)), [str(j + 1) for j in range(len(rounds))])
        ax.set_xlabel("round")
        if k == 0:
            ax.set_yticks(range(len(clients)), [_label(c, tasks_of.get(c, "")) for c in clients])
            ax.set_ylabel("client")
        else:
            ax.set_yticks(range(len(clients)), [""] * len(clients))
    fig.suptitle("Groups per round (seed 0; cell = group number)")
    fig.savefig(path, dpi=DPI)


def _draw_plots(out_dir: Path, data: QualityData, summary: dict) -> dict[str, str | None]:
    """Draw what the data allow; record why any plot was left out."""
    drawn: dict[str, str | None] = dict.fromkeys(PLOTS)
    skipped: dict[str, str] = {}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        reason = "matplotlib is not installed (pip install 'fedvec[bench]')"
        summary["plots_skipped"] = dict.fromkeys(PLOTS, reason)
        return drawn
    jobs = {
        "accuracy_per_task": (
            lambda p: _plot_per_task(p, summary),
            "no personalized measurements" if not summary["tasks"] else None,
        ),
        "accuracy_vs_round": (
            lambda p: _plot_vs_round(p, summary),
            "no personalized measurements" if not summary["rounds"] else None,
        ),
        "similarity_heatmaps": (
            lambda p: _plot_heatmaps(p, data.similarity),
            None
            if summary["similarity"]
            and summary["similarity"].get("raw") is not None
            and summary["similarity"].get("task_vector") is not None
            else "no similarity matrices were collected",
        ),
        "groups_over_rounds": (
            lambda p: _plot_groups(p, summary["groups"], data.similarity or {}),
            None if summary["groups"] else "no grouping strategy recorded groups",
        ),
    }
    for key, (draw, reason) in jobs.items():
        if reason:
            skipped[key] = reason
            continue
        draw(out_dir / PLOTS[key])
        drawn[key] = PLOTS[key]
    summary["plots_skipped"] = skipped
    return drawn


# --------------------------------------------------------------------------- entry point


def _sorted_rows(rows: list[dict], strategies: list[str]) -> list[dict]:
    rank = {s: i for i, s in enumerate(strategies)}
    kind_rank = {k: i for i, k in enumerate(KINDS)}
    return sorted(
        rows,
        key=lambda r: (
            r["seed"],
            rank.get(r["strategy"], len(rank)),
            r["strategy"],
            kind_rank[r["kind"]],
            r["round"],
            r["client"],
            r["eval_task"],
        ),
    )


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            # repr keeps every digit, so the file reads back to the same floats
            bal = r.get("balanced_accuracy")
            writer.writerow(
                {
                    **r,
                    "accuracy": repr(r["accuracy"]),
                    "balanced_accuracy": "" if bal is None else repr(bal),
                }
            )


def read_csv(path: Path) -> list[dict]:
    """results.csv back into typed rows."""
    with path.open(newline="", encoding="utf-8") as f:
        return [
            {
                **r,
                "seed": int(r["seed"]),
                "round": int(r["round"]),
                "accuracy": float(r["accuracy"]),
                "balanced_accuracy": _optional_float(r.get("balanced_accuracy")),
                "examples": int(r["examples"]),
            }
            for r in csv.DictReader(f)
        ]


def write_report(out_dir: Path, data: QualityData) -> dict:
    """Write results.csv, summary.json, report.md and the PNG plots into out_dir; return
    the summary (the same dict as summary.json)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = compute_summary(data)
    rows = _sorted_rows(_validate(data.rows), summary["strategies"])
    write_csv(out_dir / "results.csv", rows)
    plots = _draw_plots(out_dir, data, summary)
    summary["plots"] = {k: v for k, v in plots.items() if v}
    summary["meta"] = data.meta
    (out_dir / "report.md").write_text(_markdown(data, summary, plots), encoding="utf-8")
    (out_dir / "summary.json").write_text(
        json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8"
    )
    return summary
