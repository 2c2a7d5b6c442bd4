"""What a merge warns about: only measured quantities that predict a lost or damaged task, each naming the fix.

Measures (all in the report):
- residual of each task on the written file (report.py): the part of the task's K/V change on its constraint rows
  that the merged file does not reproduce. Reported, not warned on by itself: the demo's lsq-soft merge over all
  positions kept 98% of cartoonize's PSNR gain at a residual of 0.6; what predicts the loss is the comparison below.
- prompt residual of each task: the same residual on every one of the 77 positions of the task's stored
  instructions, as the UNet reads them (padding after EOS included, which "eos" targets leave to the
  regularization), beside the prompt residual of the plain average of the inputs (the linear merge). 1.0 is what
  the base itself scores (merged change 0): a merge at or above it reproduces none of the task's change on its own
  prompts. Least squares that does so, and worse than averaging, has lost the task (PROMPT_RESIDUAL_FLOOR).
  Evidence: on builtin:tiny v1 (text width 32) exact lsq over EOS rows gave synthetic instruction adapters
  1.38-5.22 (averaging 0.66-0.77) and trained ones 0.69 / 4.45 (retention -45% / -82%); lsq-soft over all
  positions 0.18-0.24. On builtin:tiny v2 (width 256, session 11, the bundled adapters of bench/tiny_tasks.py)
  the uniform 77-position residual orders image retention badly below 1.0: derain 0.83 vs averaging 0.58 kept
  68% of its PSNR gain vs averaging's 38%, denoise 0.93 vs 0.86 kept 54% vs -109%, while cartoonize 0.98 vs 1.14
  kept 41% vs 79%. The floor used to be 0.5, which fired on three of those six (task, merge) pairs where lsq kept
  more than averaging; at 1.0 none of the six warns and every v1 case above 1 still does (v1's trained derain at
  0.69 is the known miss). The UNet does not read the 77 positions equally, which a uniform residual ignores.
- drift ratio: merged drift on the regularization prompts over sqrt(sum_i source_drift_i^2), the drift the
  sources' changes would add up to if they were unrelated. Exact least squares with m rows close to the text
  width d must bend K/V on ordinary prompts to fit them all; above DRIFT_RATIO_LIMIT the merge changes what the
  base does on every prompt (its other edits) far more than the tasks themselves do. On builtin:tiny v1 (d = 32)
  pairs of demo tasks gave 0.3-3.3 at m <= 26 (trained adapters 1.0-2.5 up to m = 30) and 4.0-5.3 for synthetic
  ones at m = 26-30; the issue's m = 31 case gave ~15.
- probe retention (with probe phrasings): 1 - ||(dW - dW_i) P^T|| / ||dW_i P^T|| on phrasings of task i never
  stored (P: their token rows under the merge's position rule). Below RETENTION_LIMIT the merge does not carry
  the task to other wordings of it.
The condition number of D C^T and m / d are reported beside them; alone they do not predict a lost task (875 is
harmless), so they do not warn (past 1e10, or at m >= d, exact lsq refuses).
"""

from __future__ import annotations

import json
import math
import os

import torch

from ..errors import AdapterkitError

DRIFT_RATIO_LIMIT = 4.0  # merged drift over the sources' combined drift (calibration in the module docstring)
RETENTION_LIMIT = 0.5  # the merge keeps < 50% of a task's change on phrasings it never stored
PROMPT_RESIDUAL_FLOOR = 1.0  # the base's own residual: at or above it the merge keeps none of the task's change


def read_probes(source) -> dict[str, list[str]]:
    """Probe phrasings per task: {task: [text]}, or a file of `task: phrasing` lines (or a JSON object of lists)."""
    if source is None:
        return {}
    if isinstance(source, dict):
        return {str(k): [str(t) for t in v] for k, v in source.items()}
    if not os.path.isfile(source):
        raise AdapterkitError(f"probe instructions file {source} does not exist; pass a file of 'task: phrasing' lines")
    with open(source, encoding="utf-8-sig", errors="replace") as f:
        text = f.read()
    if source.endswith(".json"):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as e:
            raise AdapterkitError(f"{source} is not valid JSON ({e.msg}); write an object {{task: [phrasings]}}") from e
        if not isinstance(loaded, dict):
            raise AdapterkitError(f"{source} must hold a JSON object {{task: [phrasings]}}")
        return read_probes(loaded)
    probes: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        task, sep, phrasing = line.partition(":")
        if not sep or not task.strip() or not phrasing.strip():
            raise AdapterkitError(f"{source} line {number} is not 'task: phrasing'; write one task name, a colon and the phrasing")
        probes.setdefault(task.strip(), []).append(phrasing.strip())
    return probes


def score_probes(report: dict, base, tasks, written: dict, probes: dict[str, list[str]], positions: str) -> None:
    """Add {"probe": {"phrasings", "residual", "retention"}} to each task of `report` that has probe phrasings."""
    if not probes:
        return
    from . import features

    names = {t.task for t in tasks}
    unknown = sorted(set(probes) - names)
    if unknown:
        raise AdapterkitError(f"probe phrasings name task(s) {', '.join(unknown)}, not among the merged ones "
                              f"({', '.join(sorted(names))}); use those task names")
    for task, entry in zip(tasks, report["tasks"]):
        phrasings = sorted(set(probes.get(task.task, [])))
        if not phrasings:
            continue
        stored = sorted(set(phrasings) & set(task.texts))
        if stored:
            raise AdapterkitError(f"probe phrasing(s) {'; '.join(stored)} of task {task.task} are stored instructions; "
                                  "probes must be phrasings the merge never saw")
        if task.deltas is None:
            entry["probe"] = {"phrasings": len(phrasings), "residual": None, "retention": None}
            continue
        rows = torch.cat(list(features.instruction_features(base, phrasings, positions).values()))  # (k, d_text)
        residual = _residual(written, task.deltas, rows)
        entry["probe"] = {"phrasings": len(phrasings), "residual": residual,
                          "retention": None if residual is None else 1.0 - residual}


def score_prompts(report: dict, base, tasks, input_deltas: list[dict], written: dict) -> None:
    """Add "prompt_residual" and "prompt_residual_linear" (all 77 positions of the stored instructions) per task."""
    from . import features

    texts = sorted({t for task in tasks if task.deltas is not None for t in task.texts})
    every = features.instruction_features(base, texts, "all") if texts else {}
    linear = {}
    for name in {n for d in input_deltas for n in d}:
        linear[name] = sum(d[name] for d in input_deltas if name in d) / len(input_deltas)
    for task, entry in zip(tasks, report["tasks"]):
        if task.deltas is None:
            entry["prompt_residual"] = entry["prompt_residual_linear"] = None
            continue
        rows = torch.cat([every[t] for t in sorted(set(task.texts))])  # (k * 77, d_text)
        entry["prompt_residual"] = _residual(written, task.deltas, rows)
        entry["prompt_residual_linear"] = _residual(linear, task.deltas, rows)


def _residual(merged: dict, own: dict, rows: torch.Tensor) -> float | None:
    ratios = []
    for name, delta in own.items():
        want = delta @ rows.T
        if float(want.norm()) <= 1e-30:
            continue
        got = merged[name] @ rows.T if name in merged else torch.zeros_like(want)
        ratios.append(float((got - want).norm() / want.norm()))
    return sum(ratios) / len(ratios) if ratios else None


def drift_ratio(report: dict) -> float | None:
    sources = [t["source_drift"] for t in report["tasks"] if t.get("source_drift") is not None]
    combined = math.sqrt(sum(d * d for d in sources))
    return report["drift"] / combined if sources and combined > 0 else None


def warnings(report: dict, spec) -> list[str]:
    """The warnings of a merge `report` (see the module docstring); sets report["drift_ratio"]."""
    report["drift_ratio"] = drift_ratio(report)
    if spec.family != "lsq":
        return []
    out = []
    soft = not spec.exact
    for t in report["tasks"]:
        prompt, linear = t.get("prompt_residual"), t.get("prompt_residual_linear")
        if prompt is not None and prompt >= PROMPT_RESIDUAL_FLOOR and prompt > (linear or 0.0):
            fix = ("use more distinct instructions, or --method linear" if report.get("positions") == "all"
                   else "use --positions all" if soft
                   else "use --positions all (with --method lsq-soft when the rows reach the text width)")
            out.append(f"task {t['task']} is likely lost: on its own instructions as the UNet reads them (all 77 "
                       f"positions) the merged K/V are {prompt:.2f} of its change off (the base alone: 1.00), worse "
                       f"than averaging ({linear or 0.0:.2f}); {fix}")
        probe = t.get("probe") or {}
        if probe.get("retention") is not None and probe["retention"] < RETENTION_LIMIT:
            out.append(f"task {t['task']} keeps only {max(0.0, probe['retention']):.0%} of its change on "
                       f"{probe['phrasings']} probe phrasing(s) it never stored; add such phrasings to its instructions")
    ratio = report["drift_ratio"]
    if ratio is not None and ratio > DRIFT_RATIO_LIMIT:
        m, d = report.get("constraint_rows"), report.get("d_text")
        out.append(f"the merge changes K/V on ordinary prompts by {report['drift']:.1%}, {ratio:.1f}x what the sources' "
                   f"own changes add up to ({m} constraint rows of {d} text dims leave little room); use fewer or "
                   "shorter instructions" + ("" if soft else ", a smaller --max-rows, or --method lsq-soft"))
    return out
