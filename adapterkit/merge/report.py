"""What a merge reports, per task and overall, all averaged over the attn2 K/V layers.

- residual of task i:  ||W C_i^T - W_i C_i^T||_F / ||W_i C_i^T - W0 C_i^T||_F   on the task's own target rows:
  0 when the merged model reproduces the task there, 1 when it does no better than the base.
- residual is measured on the file the merge writes (float32 weights, as users load them), not on the float64
  solution, and on the rows the task owns alone (exact lsq promises ~0 there); rows shared with another task
  (identical causal prefixes) get the mean target, and `residual_all_rows` includes them.
- drift:  ||(W - W0) C_reg^T||_F / ||W0 C_reg^T||_F  on the regularization prompts, from their Gram matrix M
  (||X C_reg^T||_F^2 = n * trace(X M X^T)); each source adapter's own drift is reported beside it.
- rank: the numerical rank of each layer's update W - W0 (min and max over layers).
"""

from __future__ import annotations

import math

import torch

RANK_RTOL = 1e-7


def task_values(task, targets, index: int) -> dict[str, torch.Tensor]:
    """Layer -> (d_out, m): task `index`'s own K/V output change dW_i c_g on every row g it owns (0 elsewhere)."""
    from .lsq import scatter

    m = targets.rows.shape[0]
    return {name: scatter(raw, targets.value_maps[index], m) for name, raw in task.targets.items()}


def task_residual(written: dict[str, torch.Tensor], values: dict[str, torch.Tensor], rows: torch.Tensor, columns: list[int]) -> float | None:
    """Mean over layers of ||dW C^T - dW_i C^T|| / ||dW_i C^T|| on the rows `columns`, with dW the written file's
    update (float32 weights as users load them); layers the task leaves unchanged are skipped."""
    if not columns:
        return None
    picked = rows[columns]  # (k, d_text)
    ratios = []
    for name, value in values.items():
        want = value[:, columns]  # (d_out, k)
        denominator = want.norm()
        if denominator <= 1e-30:
            continue
        delta = written.get(name)
        got = delta @ picked.T if delta is not None else torch.zeros_like(want)
        ratios.append(float((got - want).norm() / denominator))
    return sum(ratios) / len(ratios) if ratios else None


def energies(weights: dict[str, torch.Tensor], gram: torch.Tensor) -> dict[str, float]:
    """Layer -> trace(W M W^T) = ||W C_reg^T||_F^2 / n, in float32 (a report figure: d_out x d x d per layer)."""
    gram32 = gram.to(torch.float32)
    return {name: float(((w.to(torch.float32) @ gram32) * w.to(torch.float32)).sum().clamp_min(0)) for name, w in weights.items()}


def drift(deltas: dict, base_energy: dict[str, float], gram: torch.Tensor) -> float:
    """Mean over K/V layers of ||dW C_reg^T|| / ||W0 C_reg^T|| (layers absent from `deltas` count as 0).

    A delta is a dense (d_out, d_text) matrix or LoRA-like factors (B, A): then trace(B (A M A^T) B^T) costs
    d_out x m^2 instead of d_out x d_text^2.
    """
    ratios = []
    for name, bottom in base_energy.items():
        delta = deltas.get(name)
        if delta is None:
            ratios.append(0.0)
            continue
        if isinstance(delta, tuple):
            b, a = delta
            top = float(((b @ (a @ gram @ a.T)) * b).sum().clamp_min(0))
        else:
            top = energies({name: delta}, gram)[name]
        ratios.append(math.sqrt(top / max(bottom, 1e-30)))
    return sum(ratios) / len(ratios) if ratios else 0.0


def factored_rank(b: torch.Tensor, a: torch.Tensor) -> int:
    """Numerical rank of B A (d_out x m times m x d_text) without forming it: rank of R_B R_A^T (m x m)."""
    if b.shape[1] == 0:
        return 0
    _qb, rb = torch.linalg.qr(b)
    _qa, ra = torch.linalg.qr(a.T)
    return _rank(rb @ ra.T)


def dense_rank(delta: torch.Tensor) -> int:
    """Numerical rank of a dense update; float32 singular values suffice for a report figure (and are 4x faster)."""
    return _rank(delta.to(torch.float32), rtol=1e-5)


def _rank(matrix: torch.Tensor, rtol: float = RANK_RTOL) -> int:
    s = torch.linalg.svdvals(matrix)
    if s.numel() == 0 or s[0] <= 0:
        return 0
    return int((s > rtol * s[0]).sum())


def _fmt(value, spec: str = ".2e") -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(report: dict) -> str:
    """A short text table: one line per task, then the totals and the measured diagnostics."""
    lines = [f"merge method {report['method']}" + (f" (positions {report['positions']})" if report.get("positions") else "")
             + (f", staying near the sources' average off the constraints (--prior {report['prior']})"
                if report.get("prior", "base") != "base" else "")]
    lines.append(f"{'task':<20} {'source':<24} {'rows':>5} {'shared':>6} {'residual':>9} {'prompt':>7} {'linear':>7} "
                 f"{'probe ret.':>10} {'src drift':>9}")
    for t in report["tasks"]:
        probe = (t.get("probe") or {}).get("retention")
        lines.append(
            f"{t['task'][:20]:<20} {str(t['source'])[-24:]:<24} {t['target_rows']:>5} {t['shared_rows']:>6} "
            f"{_fmt(t['residual']):>9} {_fmt(t.get('prompt_residual'), '.2f'):>7} {_fmt(t.get('prompt_residual_linear'), '.2f'):>7} "
            f"{_fmt(probe, '.0%'):>10} {_fmt(t.get('source_drift'), '.4f'):>9}"
        )
    reg = report["regularization"]
    own = (f" and the base's {reg['base_instructions']} own instructions x{reg['base_instructions_weight']:g}"
           if reg.get("base_instructions") else "")
    lines.append(f"drift on {reg['prompts']} regularization prompts{own}: {report['drift']:.4f}"
                 + (f" ({report['drift_ratio']:.2f}x the sources' combined)" if report.get("drift_ratio") is not None else ""))
    lines.append(f"rank of the update per layer: {report['rank']['min']}..{report['rank']['max']}")
    if report.get("constraint_rows") is not None:
        cond = report.get("condition_number")
        lines.append(f"constraint rows {report['constraint_rows']} of {report['d_text']} text dims"
                     + (f", solved as their top {report['principal_rows']} principal combinations, tasks balanced "
                        f"({report['principal_energy']:.4%} of the rows' energy; --max-rows)" if report.get("principal_rows") else "")
                     + (f", cond(D C^T) {cond:.2e}" if cond is not None else "")
                     + (f", ridge {report['ridge']:g}" if report.get("ridge") is not None else "")
                     + (f", target weight {report['target_weight']:g} (unnormalised {report['target_weight_unnormalised']:.3g})"
                        if report.get("target_weight") is not None else ""))
    for shared in report.get("shared_rows", {}).get("groups", [])[:5]:
        lines.append(f"shared row: tasks {', '.join(shared['tasks'])} via {'; '.join(shared['instructions'][:3])}")
    other = report.get("other_modules")
    if other:
        lines.append(f"{other['count']} modules outside attn2 K/V merged with '{other['method']}' (least squares does not apply)")
    for warning in report.get("warnings", []):
        lines.append(f"warning: {warning}")
    times = report["time_s"]
    lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()))
    return "\n".join(lines)
