"""The summary of a benchmark run: one table (a column per checkpoint, the paired difference to the first),
printed in the terminal and written as Markdown and JSON.

Rows per benchmark: its headline number, accuracy with its standard error, pass@k, its own aggregates
(We-Math's scores and IK / IG / CM / RM), then each breakdown group (MathVista per task and skill,
MathVerse per version, MMMU per discipline, ...). A difference on a row of questions is paired: the
mean over the same questions of (correct under this checkpoint - correct under the first), with the
standard error of that mean; a difference of aggregates (We-Math's scores) has no error bar.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from typing import Any

from calibrl.storage import atomic_write_text

__all__ = ["build_report", "format_markdown", "format_table", "write_report"]

# Display names, in the order We-Math's release reports them.
_METRIC_NAMES = {"accuracy": "accuracy", "score_strict": "score (strict)", "score_loose": "score (loose)",
                 "IK": "IK", "IG": "IG", "CM_strict": "CM (strict)", "RM_strict": "RM (strict)",
                 "CM_loose": "CM (loose)", "RM_loose": "RM (loose)"}


def _labels(models: list[str]) -> list[str]:
    """Short, unique column names: the last folder of a path ('run/model' keeps both parts)."""
    labels = []
    for m in models:
        parts = os.path.normpath(m).split(os.sep)
        label = "/".join(parts[-2:]) if parts[-1] in ("model", "checkpoint") and len(parts) > 1 else parts[-1]
        label = label or m
        while label in labels:
            label += "'"
        labels.append(label)
    return labels


def _paired(a: dict[str, bool], b: dict[str, bool], ids: list[str]) -> tuple[float, float]:
    """Mean and standard error of (b - a) over `ids` (in points of a share, 0-1)."""
    d = [float(b[i]) - float(a[i]) for i in ids]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def _rows(models: list[str], names: list[str], summaries: dict[str, dict[str, dict]]) -> list[dict]:
    first = models[0]
    rows: list[dict] = []

    def add(bench, label, metric, n, values, ids=None, percent=True):
        deltas = []
        for m, v in zip(models[1:], values[1:]):
            if v is None or values[0] is None:
                deltas.append(None)
            elif ids is not None:
                mean, se = _paired(summaries[first][bench]["_correct"], summaries[m][bench]["_correct"], ids)
                deltas.append({"diff": mean, "stderr": se})
            else:
                deltas.append({"diff": v - values[0], "stderr": None})
        rows.append({"bench": bench, "label": label, "metric": metric, "n": n, "values": values, "deltas": deltas,
                     "percent": percent})

    for name in names:
        s0 = summaries[first][name]
        all_ids = list(s0["_correct"])
        head = s0["headline"]
        if head != "accuracy":
            add(name, name, head, s0["metrics"].get("problems"), [summaries[m][name]["score"] for m in models])
            for key in (k for k in _METRIC_NAMES if k in s0["metrics"] and k != head):  # the benchmark's order
                add(name, "", key, s0["metrics"].get("problems"), [summaries[m][name]["metrics"].get(key)
                                                                    for m in models])
        add(name, name if head == "accuracy" else "", "accuracy", s0["n"],
            [summaries[m][name]["accuracy"] for m in models], ids=all_ids)
        for key in sorted((k for k in s0 if k.startswith("pass@")), key=lambda k: int(k[5:])):
            add(name, "", key, s0["n"], [summaries[m][name].get(key) for m in models])
        for grouping, groups in s0["breakdowns"].items():
            for key, stats in groups.items():
                ids = s0["_ids"][grouping][key]
                add(name, f"  {grouping}: {key}", "accuracy", stats["n"],
                    [summaries[m][name]["breakdowns"][grouping][key]["accuracy"] for m in models], ids=ids)
    return rows


def build_report(models: list[str], names: list[str], summaries: dict[str, dict[str, dict]], settings,
                 files: dict[str, dict[str, str]], bench_dir: str) -> dict:
    """The JSON-serialisable report: settings, per-model summaries, the table rows, the predictions files."""
    clean = {m: {b: {k: v for k, v in s.items() if not k.startswith("_")} for b, s in per.items()}
             for m, per in summaries.items()}
    return {"models": models, "labels": _labels(models), "benchmarks": names, "bench_dir": bench_dir,
            "settings": asdict(settings), "results": clean, "predictions": files,
            "table": _rows(models, names, summaries)}


def _fmt(value: Any, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:g}"


def _fmt_delta(delta: dict | None) -> str:
    if delta is None:
        return "-"
    text = f"{100 * delta['diff']:+.1f}"
    return text + (f" ± {100 * delta['stderr']:.1f}" if delta["stderr"] is not None else "")


def _cells(report: dict) -> tuple[list[str], list[list[str]]]:
    labels = report["labels"]
    header = ["benchmark", "metric", "n"] + labels + [f"Δ {lab} − {labels[0]}" for lab in labels[1:]]
    body = []
    for row in report["table"]:
        metric = _METRIC_NAMES.get(row["metric"], row["metric"])
        body.append([row["label"], metric, "" if row["n"] is None else str(row["n"])]
                    + [_fmt(v, row["percent"]) for v in row["values"]] + [_fmt_delta(d) for d in row["deltas"]])
    return header, body


def format_table(report: dict) -> str:
    """The summary as aligned plain text (percentages; Δ in points with its paired standard error)."""
    header, body = _cells(report)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    header, body = _cells(report)
    esc = lambda s: s.replace("|", "\\|").replace("  ", "&nbsp;&nbsp;")  # noqa: E731 - keep the indent
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in body]
    models = ", ".join(f"`{lab}` = {m}" for lab, m in zip(report["labels"], report["models"]))
    return ("Percent; Δ in points (paired over the same questions, ± its standard error).\n"
            f"Models: {models}.\n\n" + "\n".join(lines) + "\n")


def write_report(report: dict, out_dir: str) -> tuple[str, str]:
    """`results.json` and `results.md` in `out_dir`."""
    json_path, md_path = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")
    for path, text in ((json_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n"),
                       (md_path, format_markdown(report))):
        atomic_write_text(path, text)
    return json_path, md_path
