"""Constrained least squares over cross-attention K/V (Custom Diffusion, Kumari et al. 2212.04488, section 3.3).

For every attn2 `to_k`/`to_v` weight W (d_out, d_text), with base W0 and task weights W_i = W0 + dW_i:

    min_W ||(W - W0) C_reg^T||_F^2   subject to   W c_g = v_g  for every target row g

C_reg (n, d_text) are regularization token features, c_g the instruction token features (features.py) and v_g the
task's output on them. With M = C_reg^T C_reg / n + ridge * I, C (m, d_text) the stacked target rows,
D = C M^-1 (m, d_text) and R = V^T - W0 C^T (d_out, m):

    W = W0 + R (D C^T)^-1 D                                              ("lsq", exact)

M, D and (D C^T)^-1 depend on the text features only, so they are computed once for all layers; per layer the
update is B A with B = R (D C^T)^-1 (d_out, m) and A = D (m, d_text): rank <= m, exportable exactly as a LoRA.

Soft variant, always solvable (target rows weighted by w_g, normalised to sum 1, like M's rows):

    W = W0 + lam * R diag(w) C (lam * C^T diag(w) C + M)^-1              ("lsq-soft", lam = --target-weight)

which is the docstring formula W^T = (lam G + M)^-1 (lam sum_i C_i^T C_i W_i^T + M W0^T) rearranged; it tends to
the exact solution as lam grows.

Rows shared by several tasks (identical causal prefixes: "make it" in "make it rainy" and "make it snowy") cannot
take two values. They are merged into one row whose target is the mean of the owning tasks' outputs, the limit of
the soft objective sum_i ||W c - W_i c||^2; the result does not depend on the order of the inputs. Everything runs
in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import AdapterkitError
from .methods import DEFAULT_RIDGE, DEFAULT_TARGET_WEIGHT  # noqa: F401  (defaults live with the options)

MAX_CONDITION = 1e10  # of D C^T: beyond this float64 loses the 1e-6 accuracy the exact solve promises
SHARED_ROW_TOLERANCE = 1e-6  # rows closer than this (relative) are the same token in the same causal context


@dataclass
class Targets:
    """The deduplicated target rows of all tasks and which tasks own each row."""

    rows: torch.Tensor  # (m, d_text) float64
    owners: list[tuple[int, ...]]  # per row: the indices of the tasks whose output it must reproduce
    task_rows: list[torch.Tensor]  # per task: (k_i, d_text) all its rows, shared or not
    own_rows: list[torch.Tensor]  # per task: the rows no other task owns (exact lsq reproduces the task there)
    shared: list[dict] = field(default_factory=list)  # rows owned by several tasks: {"tasks", "instructions"}

    @property
    def weights(self) -> torch.Tensor:
        """(m,) number of owning tasks per row: the soft objective counts a shared row once per task."""
        return torch.tensor([float(len(o)) for o in self.owners], dtype=torch.float64)


def build_targets(features: dict[str, torch.Tensor], task_instructions: list[list[str]], task_names: list[str]) -> Targets:
    """Stack each instruction's rows once, then merge rows that are the same token feature across instructions.

    `features` maps instruction text -> (k, d_text) rows. Rows are visited in sorted-text order, so the row order
    (and with it every rounding) does not depend on the order of the tasks.
    """
    owners_of_text: dict[str, set[int]] = {}
    for i, texts in enumerate(task_instructions):
        for text in texts:
            owners_of_text.setdefault(text, set()).add(i)
    texts = sorted(owners_of_text)
    raw_rows, raw_owners, raw_texts = [], [], []
    for text in texts:
        for row in features[text]:
            raw_rows.append(row)
            raw_owners.append(owners_of_text[text])
            raw_texts.append(text)
    d_text = next(iter(features.values())).shape[1] if features else 0
    if not raw_rows:
        empty = [torch.zeros(0, d_text, dtype=torch.float64)] * len(task_instructions)
        return Targets(torch.zeros(0, d_text, dtype=torch.float64), [], empty, empty)
    stacked = torch.stack(raw_rows)  # (R, d_text)
    groups = _group_equal_rows(stacked)
    rows, owners, shared = [], [], []
    for members in groups:
        rows.append(stacked[members].mean(0))
        owner = sorted(set().union(*(raw_owners[j] for j in members)))
        owners.append(tuple(owner))
        if len(owner) > 1:
            shared.append({"tasks": [task_names[i] for i in owner], "instructions": sorted({raw_texts[j] for j in members})})
    def stack(indices: list[int]) -> torch.Tensor:
        return torch.stack([rows[g] for g in indices]) if indices else torch.zeros(0, d_text, dtype=torch.float64)

    task_rows = [stack([g for g, o in enumerate(owners) if i in o]) for i in range(len(task_instructions))]
    own_rows = [stack([g for g, o in enumerate(owners) if o == (i,)]) for i in range(len(task_instructions))]
    return Targets(torch.stack(rows), owners, task_rows, own_rows, shared)


def _group_equal_rows(rows: torch.Tensor) -> list[list[int]]:
    """Indices of rows grouped by (near) equality, groups ordered by first member; union-find over close pairs."""
    norms = rows.norm(dim=1)
    distance = torch.cdist(rows, rows)  # (R, R)
    scale = torch.maximum(norms[:, None], norms[None, :]).clamp_min(1e-12)
    close = (distance <= SHARED_ROW_TOLERANCE * scale).nonzero().tolist()
    parent = list(range(rows.shape[0]))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in close:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for j in range(rows.shape[0]):
        groups.setdefault(find(j), []).append(j)
    return [groups[k] for k in sorted(groups)]


def ridged(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """M + ridge * (trace(M) / d) * I: a ridge relative to M's mean eigenvalue, so it is scale free."""
    d = gram.shape[0]
    return gram + ridge * (torch.trace(gram) / d).clamp_min(1e-30) * torch.eye(d, dtype=gram.dtype)


def exact_projection(gram: torch.Tensor, rows: torch.Tensor, ridge: float = DEFAULT_RIDGE,
                     rows_per_task: dict[str, tuple[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(L = (D C^T)^-1 (m, m), A = D (m, d_text), condition number of D C^T), shared by every layer.

    Raises AdapterkitError when the constraints cannot all hold: more rows than text dimensions, or rows so
    nearly dependent that D C^T is singular in float64. `rows_per_task` (task -> (rows, instructions)) lets the
    message say what each adapter brings (issue 18).
    """
    m, d_text = rows.shape
    if m > d_text:
        brought = ""
        if rows_per_task:
            each = ", ".join(f"{task} {k} from {n} instruction{'s' if n != 1 else ''}" for task, (k, n) in rows_per_task.items())
            brought = f" ({each}; a row shared by several tasks counts once)"
        raise AdapterkitError(
            f"the instructions give {m} target token rows{brought} but the text features have only {d_text} "
            f"dimensions, so the exact constraints cannot all hold; pass --method lsq-soft (the soft form, always "
            f"solvable), or merge adapters that store fewer or shorter instructions (at most {d_text} rows in all)"
        )
    gram = ridged(gram, ridge)
    d = torch.linalg.solve(gram, rows.T).T  # (m, d_text) = C M^-1 (M is symmetric)
    k = d @ rows.T  # (m, m) = D C^T, symmetric positive definite when C has full row rank
    k = (k + k.T) / 2
    eig = torch.linalg.eigvalsh(k)
    condition = float(eig[-1] / eig[0]) if eig[0] > 0 else float("inf")
    if condition > MAX_CONDITION:
        raise AdapterkitError(
            f"the {m} target token rows are (nearly) linearly dependent in the {d_text}-dim text feature space "
            f"(condition number of D C^T {condition:.2e}), so the exact constraints cannot all hold; use --method "
            "lsq-soft, or fewer instructions"
        )
    return torch.linalg.inv(k), d, condition


def soft_projection(
    gram: torch.Tensor, rows: torch.Tensor, row_weights: torch.Tensor, target_weight: float, ridge: float = DEFAULT_RIDGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L = lam * diag(w) (m, m), A = C (lam C^T diag(w) C + M)^-1 (m, d_text)) with w normalised to sum 1."""
    if target_weight <= 0:
        raise AdapterkitError(f"--target-weight must be positive, got {target_weight}")
    w = row_weights / row_weights.sum()
    target_gram = rows.T @ (w[:, None] * rows)  # (d_text, d_text)
    system = target_weight * target_gram + ridged(gram, ridge)
    a = torch.linalg.solve(system, rows.T).T  # (m, d_text); the system is symmetric
    return target_weight * torch.diag(w), a


def layer_residual_targets(deltas: list[torch.Tensor | None], targets: Targets, d_out: int) -> torch.Tensor:
    """R = V^T - W0 C^T (d_out, m): column g is the mean over owning tasks of dW_i c_g (W_i = W0 + dW_i)."""
    r = torch.zeros(d_out, targets.rows.shape[0], dtype=torch.float64)
    counts = targets.weights
    for i, delta in enumerate(deltas):
        if delta is None:  # this task leaves the layer at W0: its contribution dW_i c is zero
            continue
        mine = [g for g, o in enumerate(targets.owners) if i in o]
        if mine:
            r[:, mine] += (delta @ targets.rows[mine].T) / counts[mine]
    return r


def solve_layer(deltas: list[torch.Tensor | None], targets: Targets, left: torch.Tensor, right: torch.Tensor, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's update as LoRA factors (B (d_out, m), A (m, d_text)); W = W0 + B A."""
    return layer_residual_targets(deltas, targets, d_out) @ left, right
