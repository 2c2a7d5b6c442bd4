"""What a merge reports, per task and overall, all averaged over the attn2 K/V layers.

- residual of task i:  ||W C_i^T - W_i C_i^T||_F / ||W_i C_i^T - W0 C_i^T||_F   on the task's own target rows:
  0 when the merged model reproduces the task there, 1 when it does no better than the base.
- drift:  ||(W - W0) C_reg^T||_F / ||W0 C_reg^T||_F  on the regularization prompts, from their Gram matrix M
  (||X C_reg^T||_F^2 = n * trace(X M X^T)); each source adapter's own drift is reported beside it.
- rank: the numerical rank of each layer's update W - W0 (min and max over layers).
"""

from __future__ import annotations

import math

import torch

RANK_RTOL = 1e-7


def task_residual(merged: dict[str, torch.Tensor], task_delta: dict[str, torch.Tensor], rows: torch.Tensor) -> float | None:
    """Mean over layers of ||(dW - dW_i) C_i^T|| / ||dW_i C_i^T||; layers the task leaves unchanged are skipped."""
    if rows.shape[0] == 0:
        return None
    ratios = []
    for name, delta in merged.items():
        own = task_delta.get(name)
        if own is None:
            continue
        denominator = (own @ rows.T).norm()
        if denominator <= 1e-12 * (own.norm() * rows.norm()).clamp_min(1e-30):
            continue
        ratios.append(float(((delta - own) @ rows.T).norm() / denominator))
    return sum(ratios) / len(ratios) if ratios else None


def drift(deltas: dict[str, torch.Tensor], base_weights: dict[str, torch.Tensor], gram: torch.Tensor) -> float:
    """Mean over K/V layers of ||dW C_reg^T|| / ||W0 C_reg^T||, computed from M = C_reg^T C_reg / n."""
    ratios = []
    for name, w0 in base_weights.items():
        delta = deltas.get(name)
        if delta is None:
            ratios.append(0.0)
            continue
        top = torch.einsum("od,de,oe->", delta, gram, delta).clamp_min(0)
        bottom = torch.einsum("od,de,oe->", w0, gram, w0).clamp_min(1e-30)
        ratios.append(math.sqrt(float(top / bottom)))
    return sum(ratios) / len(ratios) if ratios else 0.0


def factored_rank(b: torch.Tensor, a: torch.Tensor) -> int:
    """Numerical rank of B A (d_out x m times m x d_text) without forming it: rank of R_B R_A^T (m x m)."""
    if b.shape[1] == 0:
        return 0
    _qb, rb = torch.linalg.qr(b)
    _qa, ra = torch.linalg.qr(a.T)
    return _rank(rb @ ra.T)


def dense_rank(delta: torch.Tensor) -> int:
    return _rank(delta)


def _rank(matrix: torch.Tensor) -> int:
    s = torch.linalg.svdvals(matrix)
    if s.numel() == 0 or s[0] <= 0:
        return 0
    return int((s > RANK_RTOL * s[0]).sum())


def format_table(report: dict) -> str:
    """A short text table: one line per task, then the totals."""
    lines = [f"merge method {report['method']}" + (f" (positions {report['positions']})" if report.get("positions") else "")]
    lines.append(f"{'task':<24} {'source':<28} {'rows':>5} {'residual':>10} {'source drift':>13}")
    for t in report["tasks"]:
        residual = "n/a" if t["residual"] is None else f"{t['residual']:.2e}"
        lines.append(f"{t['task'][:24]:<24} {str(t['source'])[-28:]:<28} {t['target_rows']:>5} {residual:>10} {t['source_drift']:>13.4f}")
    lines.append(f"drift on {report['regularization']['prompts']} regularization prompts: {report['drift']:.4f}")
    lines.append(f"rank of the update per layer: {report['rank']['min']}..{report['rank']['max']}")
    if report.get("condition_number") is not None:
        lines.append(f"constraint rows {report['constraint_rows']} of {report['d_text']} text dims, cond(D C^T) {report['condition_number']:.2e}")
    for shared in report.get("shared_rows", {}).get("groups", [])[:5]:
        lines.append(f"shared row (mean target): tasks {', '.join(shared['tasks'])} via {'; '.join(shared['instructions'][:3])}")
    other = report.get("other_modules")
    if other:
        lines.append(f"{other['count']} modules outside attn2 K/V merged with '{other['method']}' (least squares does not apply)")
    times = report["time_s"]
    lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()))
    return "\n".join(lines)
