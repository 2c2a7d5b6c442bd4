"""Constrained least squares over cross-attention K/V (Custom Diffusion, Kumari et al. 2212.04488, section 3.3).

For every attn2 `to_k`/`to_v` weight W (d_out, d_text), with base W0 and task weights W_i = W0 + dW_i:

    min_W ||(W - W0) C_reg^T||_F^2   subject to   W c_g = v_g  for every target row g

C_reg (n, d_text) are regularization token features, c_g the instruction token features (features.py) and v_g the
task's output on them. With M = C_reg^T C_reg / n + ridge * I, C (m, d_text) the stacked target rows,
D = C M^-1 (m, d_text) and R = V^T - W0 C^T (d_out, m):

    W = W0 + R (D C^T)^-1 D                                              ("lsq", exact)

M, D and (D C^T)^-1 depend on the text features only, so they are computed once for all layers; per layer the
update is B A with B = R (D C^T)^-1 (d_out, m) and A = D (m, d_text): rank <= m, exportable exactly as a LoRA.
Dividing M by n changes nothing here (D scales by n, (D C^T)^-1 by 1/n).

Soft variant, always solvable: with w_g the weight of row g (the number of tasks owning it) and lam = target_weight,

    min_W  lam * sum_g (w_g / sum_g w_g) ||W c_g - v_g||^2  +  (1/n) ||(W - W0) C_reg^T||_F^2  (+ ridge)

i.e. lam weighs the MEAN target row against the MEAN regularization row, whatever the counts m and n. Solution:

    W^T = (lam G + M)^-1 (lam sum_g w~_g c_g v_g^T + M W0^T),  G = sum_g w~_g c_g c_g^T,  w~_g = w_g / sum w
    W   = W0 + lam * R diag(w~) C (lam G + M)^-1                         ("lsq-soft")

In the unnormalised form (lam' sum_i C_i^T C_i + C_reg^T C_reg) this is lam' = lam * n / sum_g w_g (the report
prints it as `target_weight_unnormalised`). It tends to the exact solution as lam grows.

Prior (`prior="average"`, issue 12). Off the constraints the paper keeps K/V near the base's, W0. Staying near the
sources' average instead, W_avg = W0 + P with P = mean_i dW_i (what --method linear gives), is the same problem
with W0 replaced by W_avg:

    min_W ||(W - W_avg) C_reg^T||_F^2  s.t.  W c_g = v_g   =>   W = W0 + P + (R - P C^T) (D C^T)^-1 D

(and likewise for lsq-soft): the constraints hold exactly as before, and on text directions they do not fix the
merge acts as the average does. That keeps more of a task whose adapter works through the words and padding
positions after EOS, which the end-of-text rows do not constrain (builtin:tiny v2, derain + cartoonize, 16
validation rows: cartoonize kept 85% of its gain against the paper's 48%), and moves the base's other edits as
much as averaging does (1-7 dB on general edits, against the paper's 0.3-1.2): for a bank that routes other
instructions to the base, not for a checkpoint used on everything. The update is dense (rank up to d_text).

Rows shared by several tasks (identical causal prefixes: "make it" in "make it rainy" and "make it snowy") cannot
take two values. Rule "mean" (default): one row whose target is the mean of the owning tasks' outputs, the limit of
the soft objective sum_i ||W c - W_i c||^2; the result does not depend on the order of the inputs. Rule "first"
(the reference code's): the first task in input order keeps the row, later ones lose it (order-dependent).
Everything runs in float64.

Row budget (issue 12; exact lsq). With m near d_text the constraints alone fix W on nearly every prompt: the merge
then interpolates through its rows and moves K/V everywhere else (builtin:tiny, four tasks whose words the tiny
vocabulary splits into characters: 245 rows of 256, K/V on ordinary prompts moved by 122%). Above `row_budget`
rows (ROW_BUDGET_SHARE of d_text unless --max-rows says otherwise) the stacked rows C = U S V^T are replaced by
their top k principal combinations C' = U_k^T C (k, d_text), with targets R U_k: the exact solve on them is the
least-squares fit of every row within the k directions the rows use most, and B = R U_k L' (principal_rows).
U_k comes from the rows each weighted by 1 / sqrt(E_t), E_t the energy of its task's targets R over every layer
(task_balance): without it a task whose adapter changes K/V less loses its rows to the others (builtin:tiny's four
demo tasks, 156 rows solved as 96: denoise, whose adapter moves K/V about half as much as the others, kept 71% of
its gain on validation rows, 80% with the balance; the other three unchanged within 1 point. bench/fresh_tasks.py's
four: the three weaker gain 3-5 points, sketch, the strongest, loses 16: 90% -> 74%).

A task is given by its raw rows and its outputs there (`TaskRows`): from an adapter, dW_i C_i^T; from a merged
adapter that stored them (incremental.py), the stored values. Grouping near-equal rows sorts them along one
direction and compares neighbours only: O(R) memory and O(R log R) time for R raw rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import AdapterkitError
from .methods import DEFAULT_RIDGE, DEFAULT_TARGET_WEIGHT, ROW_BUDGET_SHARE  # noqa: F401  (defaults live with the options)

MAX_CONDITION = 1e10  # of D C^T: beyond this float64 loses the 1e-6 accuracy the exact solve promises
SHARED_ROW_TOLERANCE = 1e-6  # rows closer than this (relative) are the same token in the same causal context
SHARED_ROW_RULES = ("mean", "first")


@dataclass
class TaskRows:
    """What least squares needs of one task: its constraint rows and its K/V outputs on them."""

    task: str
    texts: list[str]  # per raw row: the instruction it comes from
    rows: torch.Tensor  # (k, d_text) float64
    targets: dict[str, torch.Tensor]  # K/V layer -> (d_out, k) float64 = dW_i C_i^T; absent layer: dW_i = 0 there
    deltas: dict[str, torch.Tensor] | None = None  # K/V layer -> dW_i, when the task comes from an adapter (not stored rows)


@dataclass
class Targets:
    """The grouped target rows of all tasks, which tasks own each row and how raw targets map onto the rows."""

    rows: torch.Tensor  # (m, d_text) float64
    owners: list[tuple[int, ...]]  # per row: the indices of the tasks whose rows it holds
    solve_maps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per task: (raw j, row g, weight): R += T_j w
    value_maps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per task: its own value on row g
    weights: torch.Tensor  # (m,) weight of each row in the soft objective
    shared: list[dict] = field(default_factory=list)  # rows owned by several tasks: {"tasks", "instructions"}

    def columns(self, task: int, own: bool) -> list[int]:
        """Rows of `task`: all it owns (own=False) or those no other task owns (own=True)."""
        return [g for g, o in enumerate(self.owners) if (o == (task,) if own else task in o)]


def build_targets(tasks: list[TaskRows], rule: str = "mean") -> Targets:
    """Group equal rows across all tasks' raw rows and decide each row's target (rule "mean" or "first").

    Raw rows are stacked in (instruction text, task name) order, so with rule "mean" the row order (and with it
    every rounding) does not depend on the order of the tasks; rule "first" gives each row to the first task in
    input order that has it.
    """
    if rule not in SHARED_ROW_RULES:
        raise AdapterkitError(f"unknown shared-row rule '{rule}'; use one of {', '.join(SHARED_ROW_RULES)}")
    d_text = next((t.rows.shape[1] for t in tasks if t.rows.numel()), 0)
    entries = sorted(((t.texts[j], t.task, i, j) for i, t in enumerate(tasks) for j in range(len(t.texts))))
    if not entries:
        empty = (torch.zeros(0, dtype=torch.long),) * 2 + (torch.zeros(0, dtype=torch.float64),)
        return Targets(torch.zeros(0, d_text, dtype=torch.float64), [], [empty] * len(tasks), [empty] * len(tasks),
                       torch.zeros(0, dtype=torch.float64))
    stacked = torch.stack([tasks[i].rows[j] for _text, _task, i, j in entries])  # (R, d_text)
    rows, owners, weights, shared = [], [], [], []
    solve = [[] for _ in tasks]
    value = [[] for _ in tasks]
    for g, members in enumerate(_group_equal_rows(stacked)):
        by_task: dict[int, list[int]] = {}
        for e in members:
            by_task.setdefault(entries[e][2], []).append(entries[e][3])
        owner = tuple(sorted(by_task))
        owners.append(owner)
        for i, js in by_task.items():
            value[i] += [(j, g, 1.0 / len(js)) for j in js]
        if rule == "mean":
            rows.append(stacked[members].mean(0))
            for i, js in by_task.items():
                solve[i] += [(j, g, 1.0 / (len(js) * len(owner))) for j in js]
            weights.append(float(len(owner)))
        else:  # first task in input order, its first row: the reference code's duplicate rule
            first, j0 = owner[0], min(by_task[owner[0]])
            rows.append(tasks[first].rows[j0])
            solve[first].append((j0, g, 1.0))
            weights.append(1.0)
        if len(owner) > 1:
            shared.append({"tasks": [tasks[i].task for i in owner], "instructions": sorted({entries[e][0] for e in members})})
    return Targets(torch.stack(rows), owners, [_as_map(s) for s in solve], [_as_map(v) for v in value],
                   torch.tensor(weights, dtype=torch.float64), shared)


def _as_map(triples: list[tuple[int, int, float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    j = torch.tensor([t[0] for t in triples], dtype=torch.long)
    g = torch.tensor([t[1] for t in triples], dtype=torch.long)
    return j, g, torch.tensor([t[2] for t in triples], dtype=torch.float64)


def _group_equal_rows(rows: torch.Tensor) -> list[list[int]]:
    """Indices of rows grouped by (near) equality, groups ordered by first member.

    Two rows a, b are equal when ||a - b|| <= tol * max(||a||, ||b||). Then their projections on a unit vector u
    differ by at most tol * max norm (Cauchy-Schwarz): after sorting by projection, every equal pair lies within a
    window, and the pairs at sorted offset k are checked only while some pair at offset k is inside it. Memory O(R);
    time O(R log R) plus R times the largest run of rows inside one window (a group of equal rows).
    """
    count = rows.shape[0]
    norms = rows.norm(dim=1)
    direction = torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(0), dtype=rows.dtype)
    projection = rows @ (direction / direction.norm())  # (R,)
    order = torch.argsort(projection)
    sorted_projection = projection[order]
    window = SHARED_ROW_TOLERANCE * float(norms.max()) if count else 0.0
    parent = list(range(count))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for offset in range(1, count):
        near = ((sorted_projection[offset:] - sorted_projection[:-offset]) <= window).nonzero().flatten()
        if near.numel() == 0:
            break
        a, b = order[near], order[near + offset]
        scale = torch.maximum(norms[a], norms[b]).clamp_min(1e-12)
        close = (rows[a] - rows[b]).norm(dim=1) <= SHARED_ROW_TOLERANCE * scale
        for x, y in zip(a[close].tolist(), b[close].tolist()):
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
    groups: dict[int, list[int]] = {}
    for j in range(count):
        groups.setdefault(find(j), []).append(j)
    return [groups[k] for k in sorted(groups)]


def ridged(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """M + ridge * (trace(M) / d) * I: a ridge relative to M's mean eigenvalue, so it is scale free."""
    d = gram.shape[0]
    return gram + ridge * (torch.trace(gram) / d).clamp_min(1e-30) * torch.eye(d, dtype=gram.dtype)


def exact_projection(gram: torch.Tensor, rows: torch.Tensor, ridge: float = DEFAULT_RIDGE,
                     brought: str = "") -> tuple[torch.Tensor, torch.Tensor, float]:
    """(L = (D C^T)^-1 (m, m), A = D (m, d_text), condition number of D C^T), shared by every layer.

    Raises AdapterkitError when the constraints leave the regularization nothing to choose (m >= d_text: the rows
    alone fix W, as on every prompt) or are so nearly dependent that D C^T is singular in float64. `brought`
    ("derain 31 from 5 instructions, ...") lets the message say what each adapter brings (issues 15, 18).
    """
    m, d_text = rows.shape
    if m >= d_text:
        each = f" ({brought}; a row shared by several tasks counts once)" if brought else ""
        raise AdapterkitError(
            f"{m} target token rows{each} but the text features have only {d_text} dimensions: exact lsq needs fewer "
            "rows than dimensions (with m >= d the rows alone fix K/V on every prompt); pass a smaller --max-rows, "
            "--method lsq-soft (the "
            f"soft form, always solvable), or merge adapters that store fewer or shorter instructions (fewer than "
            f"{d_text} rows in all)"
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


def row_budget(d_text: int, max_rows: int | None = None) -> int:
    """Most constraint rows exact lsq solves as they are: `max_rows`, or ROW_BUDGET_SHARE of the text width."""
    return int(max_rows) if max_rows is not None else max(1, int(d_text * ROW_BUDGET_SHARE))


def principal_rows(rows: torch.Tensor, budget: int, weights: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(rows to solve (k, d_text), rotation U_k (m, k) or None, share of the rows' energy kept).

    Up to `budget` rows: the rows themselves (no rotation). Beyond: C' = U_k^T C, U_k the top k = `budget` left
    singular vectors of diag(weights) C (of C itself without weights: C' = S_k V_k^T); the caller maps the solve
    back with left = U_k L' (module docstring)."""
    m = rows.shape[0]
    if m <= budget:
        return rows, None, 1.0
    weighted = rows if weights is None else rows * weights[:, None]
    u, _, _ = torch.linalg.svd(weighted, full_matrices=False)  # (m, d_text) = U S V^T
    rotation = u[:, :budget]  # (m, k)
    kept = rotation.T @ rows
    return kept, rotation, float((kept**2).sum() / (rows**2).sum())


def task_balance(tasks: list[TaskRows], targets: Targets, layers: dict[str, int]) -> torch.Tensor:
    """(m,) row weights for principal_rows: 1 / sqrt(E_t) on the rows of task t, E_t its targets' energy over every
    layer on the rows it alone owns (a shared row: the mean of its owners' E; a task with none: the mean over the
    tasks), scaled to mean 1. `layers`: K/V layer -> d_out."""
    m = targets.rows.shape[0]
    per_row = torch.zeros(m, dtype=torch.float64)
    for layer, d_out in layers.items():
        per_row += (layer_residual_targets(tasks, targets, layer, d_out) ** 2).sum(0)
    energy = [float(per_row[targets.columns(i, own=True)].sum()) for i in range(len(tasks))]
    known = [e for e in energy if e > 0]
    if not known:
        return torch.ones(m, dtype=torch.float64)
    energy = [e if e > 0 else sum(known) / len(known) for e in energy]
    weights = torch.tensor([(sum(energy[i] for i in own) / len(own)) ** -0.5 for own in targets.owners], dtype=torch.float64)
    return weights / weights.mean()


DUAL_SOFT_MAX_ROWS = 2048  # lsq-soft solves in the m x m (dual) form up to this many rows, else in d_text x d_text


def soft_projection(
    gram: torch.Tensor, rows: torch.Tensor, row_weights: torch.Tensor, target_weight: float, ridge: float = DEFAULT_RIDGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L (m, m), A (m, d_text)) with B = R L: the soft solution of the module docstring.

    Up to DUAL_SOFT_MAX_ROWS rows it is solved as the exact form plus a diagonal (push-through identity):
    lam diag(w~) C (lam G + M)^-1 = (D C^T + diag(1 / (lam w~)))^-1 D with D = C M^-1, as well conditioned as the
    exact solve even when M is nearly singular; beyond, as (L = lam diag(w~), A = C (lam G + M)^-1).
    """
    if target_weight <= 0:
        raise AdapterkitError(f"--target-weight must be positive, got {target_weight}")
    w = row_weights / row_weights.sum()
    gram = ridged(gram, ridge)
    if rows.shape[0] <= DUAL_SOFT_MAX_ROWS:
        d = torch.linalg.solve(gram, rows.T).T  # (m, d_text) = C M^-1
        k = d @ rows.T
        k = (k + k.T) / 2 + torch.diag(1.0 / (target_weight * w))  # (m, m) D C^T + diag(1 / (lam w~))
        return torch.linalg.inv(k), d
    target_gram = rows.T @ (w[:, None] * rows)  # (d_text, d_text) = G
    a = torch.linalg.solve(target_weight * target_gram + gram, rows.T).T  # (m, d_text); the system is symmetric
    return target_weight * torch.diag(w), a


def scatter(raw: torch.Tensor, mapping: tuple[torch.Tensor, torch.Tensor, torch.Tensor], m: int) -> torch.Tensor:
    """(d_out, m): column g = sum over the map's (j, g, w) of w * raw[:, j]."""
    j, g, w = mapping
    out = torch.zeros(raw.shape[0], m, dtype=torch.float64)
    return out.index_add_(1, g, raw[:, j] * w) if j.numel() else out


def layer_residual_targets(tasks: list[TaskRows], targets: Targets, layer: str, d_out: int) -> torch.Tensor:
    """R = V^T - W0 C^T (d_out, m) on one layer: each row's target (mean of its owners' or the first one's)."""
    m = targets.rows.shape[0]
    r = torch.zeros(d_out, m, dtype=torch.float64)
    for task, mapping in zip(tasks, targets.solve_maps):
        raw = task.targets.get(layer)
        if raw is not None:  # a task that leaves the layer at W0 contributes dW_i c = 0
            r += scatter(raw, mapping, m)
    return r


def solve_layer(tasks: list[TaskRows], targets: Targets, left: torch.Tensor, right: torch.Tensor, layer: str, d_out: int):
    """The layer's update as LoRA factors (B (d_out, m), A (m, d_text)); W = W0 + B A."""
    return layer_residual_targets(tasks, targets, layer, d_out) @ left, right


def solve_layer_near(prior: torch.Tensor, tasks: list[TaskRows], targets: Targets, left: torch.Tensor,
                     right: torch.Tensor, layer: str, d_out: int) -> torch.Tensor:
    """The layer's dense update (d_out, d_text) near the prior update P (module docstring): P + (R - P C^T) L A."""
    residual = layer_residual_targets(tasks, targets, layer, d_out) - prior @ targets.rows.T  # (d_out, m)
    return prior + (residual @ left) @ right
