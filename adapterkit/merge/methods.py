"""The merge-method registry and the typed options every method reads; all validation of merge options is here.

Imports no torch: the CLI builds `--method` and its other choices from this module. A new merge method is one
entry in METHODS plus its maths (lsq.py for least squares, baselines.py for exact combinations of full deltas).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import AdapterkitError

DEFAULT_DENSITY = 0.5  # ties / dare: fraction of each delta kept
# lsq's ridge on M, relative to its mean eigenvalue. Where the base records its own instructions (below) the default is
# BASE_INSTRUCTIONS_RIDGE, else DEFAULT_RIDGE (resolve_lsq_defaults).
# DEFAULT_RIDGE only keeps M invertible when C_reg spans few directions. Measured on builtin:tiny v1 with the demo's
# trained adapters (README, merge): 1e-6 (0.1x M's smallest eigenvalue there) moved the exact update by 3% for
# nothing; 1e-9 moves it by 3e-5. Drift, which the ridge biases, is lowest unridged.
DEFAULT_RIDGE = 1e-9
# On builtin:tiny v2.1 a larger ridge is what lets a merge follow phrasings its sources never stored (session 18,
# bench/tiny_tasks.py, derain + cartoonize, 64 held-out rows: derain kept 19% at 1e-9, 74% at 1e-2 with the base's
# instructions weighted in); alone it costs the base's other edits (up to -4.7 dB at 1e-2), which the weighting gives
# back (-0.3..-2.1 dB). It costs stored phrasings some retention (two-task merges: demo derain 95 -> 91%, cartoonize
# 94 -> 97%; bench/fresh_tasks.py desnow 86 -> 78%, dehaze 99 -> 84%) for 20-65 points on never-stored ones.
BASE_INSTRUCTIONS_RIDGE = 1e-2
# lsq: each row of the base's own instructions (adapterkit_base.json "instructions": the edits it was trained on)
# counts this many times in the regularization Gram, M = (n M_reg + w n_b M_base) / (n + w n_b): the merge then keeps
# the base's own edits as they are. 10 kept brighter / invert / sepia / blur at -1.6 / -2.3 / -2.5 / -0.3 dB, 100 at
# -1.2 / -1.8 / -2.1 / -0.3 with the same task retention (README, merge).
DEFAULT_BASE_INSTRUCTIONS_WEIGHT = 100.0
DEFAULT_TARGET_WEIGHT = 1e4  # lsq-soft: lambda
# lsq target tokens (features.py): 1..first EOS; those plus each instruction's padding block summarised by its top
# principal directions; all 77. "auto" picks eos+padding when every source was trained with K/V preservation, else
# eos (resolve_positions).
TARGET_POSITIONS = ("eos", "eos+padding", "all")
POSITIONS = ("auto",) + TARGET_POSITIONS
REG_POSITIONS = ("all", "eos")  # lsq regularization tokens: all 77 (default), or 1..first EOS as the reference code
SHARED_ROWS = ("mean", "first")  # lsq rows of several tasks: mean target (order free), or the first task's (reference)
OTHER_MODULE_METHODS = ("linear", "sum")  # lsq: how LoRA modules outside attn2 K/V are merged
# lsq: the K/V the merge keeps where the constraints say nothing: the base's (the paper), or the sources' average
# (what --method linear gives), corrected so every constraint still holds (lsq.py).
PRIORS = ("base", "average")
# Exact lsq keeps at most this share of the text width as constraints (--max-rows overrides). Beyond it the rows are
# replaced by their top principal combinations (lsq.principal_rows): with m near d_text the constraints alone fix K/V
# on nearly every prompt. builtin:tiny (d_text 256, validation rows): four fresh tasks (bench/fresh_tasks.py, 245
# rows; their words outside the tiny vocabulary go by characters) kept -176 / 93 / 68 / 1% with every row, the base's
# general edits -15..-24 dB; at 96 rows 25 / 86 / 91 / 91% and -0.7..-3.1 dB. The demo's four (156 rows): 101 / 80
# / 73 / 98% with every row, 98 / 112 / 72 / 99% at 96, general edits -2.6..-6.6 dB -> -0.5..-2.9. At 128 and 160
# rows the fresh four lost -1.7..-10 dB on general edits. Two tasks on builtin:tiny bring 77-107 rows: only the
# fresh pair (107) is cut, to 96.
ROW_BUDGET_SHARE = 3 / 8


@dataclass(frozen=True)
class MergeMethod:
    name: str
    family: str  # "lsq": least squares on attn2 K/V (lsq.py); "baseline": exact on full deltas (baselines.py)
    help: str
    reads: tuple[str, ...]  # MergeOptions fields it uses
    exact: bool = False  # lsq family: exact constraints (True) or the soft, weighted variant
    normalised: bool = False  # baselines: weights divided by their sum (a weighted average)


METHODS = {m.name: m for m in (
    MergeMethod("lsq", "lsq", "constrained least squares on K/V: each task's instructions give its targets exactly",
                ("ridge", "base_instructions_weight", "positions", "reg_positions", "shared_rows", "other_modules", "prior",
                 "max_rows"), exact=True),
    MergeMethod("lsq-soft", "lsq", "least squares with the targets weighted by target_weight instead of exact",
                ("target_weight", "ridge", "base_instructions_weight", "positions", "reg_positions", "shared_rows",
                 "other_modules", "prior")),
    MergeMethod("sum", "baseline", "task arithmetic: sum of weighted deltas", ("weights",)),
    MergeMethod("linear", "baseline", "weighted average of deltas", ("weights",), normalised=True),
    MergeMethod("ties", "baseline", "TIES: trim to density, elect signs, disjoint mean", ("weights", "density")),
    MergeMethod("dare", "baseline", "DARE: random drop to density, rescale; seeded", ("weights", "density", "seed")),
    MergeMethod("svd", "baseline", "the exact sum truncated to rank singular directions", ("weights", "rank")),
)}
BASELINES = tuple(name for name, m in METHODS.items() if m.family == "baseline")


@dataclass(frozen=True)
class MergeOptions:
    """Everything a merge method may read (each reads the fields in its MergeMethod.reads)."""

    weights: list[float] | None = None  # per adapter, in order (baselines); None: all 1
    density: float = DEFAULT_DENSITY  # ties / dare: fraction kept
    seed: int = 0  # dare: seed of the drop masks
    rank: int | None = None  # svd: truncation rank
    target_weight: float = DEFAULT_TARGET_WEIGHT  # lsq-soft: lambda
    ridge: float | None = None  # lsq: ridge on M, relative to its mean eigenvalue (None: resolve_lsq_defaults)
    base_instructions_weight: float | None = None  # lsq: weight of the base's own instructions (None: resolved)
    positions: str = "auto"  # lsq: target token positions (POSITIONS)
    reg_positions: str = "all"  # lsq: regularization token positions (REG_POSITIONS)
    shared_rows: str = "mean"  # lsq: target of a row several tasks share (SHARED_ROWS)
    other_modules: str = "linear"  # lsq: merge rule for LoRA modules outside attn2 K/V (OTHER_MODULE_METHODS)
    prior: str = "base"  # lsq: what the solution stays near off the constraints (PRIORS)
    max_rows: int | None = None  # lsq: most constraint rows solved exactly (None: ROW_BUDGET_SHARE of the text width)
    as_lora: bool = False  # write a LoRA instead of full K/V


def get(name: str) -> MergeMethod:
    if name not in METHODS:
        raise AdapterkitError(f"unknown merge method '{name}'; use one of {', '.join(METHODS)}")
    return METHODS[name]


def check_options(name: str, options: MergeOptions, count: int | None = None) -> MergeMethod:
    """Raise on the first option `name` cannot run with; `count` (number of adapters) checks the weights too."""
    method = get(name)
    if options.positions not in POSITIONS:
        raise AdapterkitError(f"unknown --positions '{options.positions}'; use one of {', '.join(POSITIONS)}")
    if options.reg_positions not in REG_POSITIONS:
        raise AdapterkitError(f"unknown --reg-positions '{options.reg_positions}'; use one of {', '.join(REG_POSITIONS)}")
    if options.shared_rows not in SHARED_ROWS:
        raise AdapterkitError(f"unknown --shared-rows '{options.shared_rows}'; use one of {', '.join(SHARED_ROWS)}")
    for flag, value in (("--ridge", options.ridge), ("--base-instructions-weight", options.base_instructions_weight)):
        if value is not None and not value >= 0:  # also refuses nan
            raise AdapterkitError(f"{flag} must be >= 0, got {value}")
    if options.base_instructions_weight is not None and "base_instructions_weight" not in method.reads:
        raise AdapterkitError(f"--base-instructions-weight applies to least squares (lsq, lsq-soft), not to --method {name}")
    if options.other_modules not in OTHER_MODULE_METHODS:
        raise AdapterkitError(f"--other-modules must be one of {', '.join(OTHER_MODULE_METHODS)}, got '{options.other_modules}'")
    if options.prior not in PRIORS:
        raise AdapterkitError(f"unknown --prior '{options.prior}'; use one of {', '.join(PRIORS)}")
    if options.prior != "base" and "prior" not in method.reads:
        raise AdapterkitError(f"--prior applies to least squares (lsq, lsq-soft), not to --method {name}; "
                              "--method linear is already the sources' average")
    if options.max_rows is not None and "max_rows" not in method.reads:
        raise AdapterkitError(f"--max-rows applies to exact least squares (--method lsq), not to --method {name}")
    if options.max_rows is not None and options.max_rows < 1:
        raise AdapterkitError(f"--max-rows must be at least 1, got {options.max_rows}")
    if "rank" in method.reads and (options.rank is None or options.rank < 1):
        raise AdapterkitError(f"--method {name} needs --rank R (R >= 1): the rank the exact sum is truncated to")
    if "density" in method.reads and not 0.0 < options.density <= 1.0:
        raise AdapterkitError(f"--density must be in (0, 1], got {options.density}")
    if options.weights is not None and "weights" not in method.reads:
        raise AdapterkitError(f"--weights applies to the baseline methods ({', '.join(BASELINES)}), not to least squares")
    if options.weights is not None and count is not None:
        if len(options.weights) != count:
            raise AdapterkitError(f"--weights has {len(options.weights)} values for {count} adapters; give one weight per adapter")
        if method.normalised and abs(sum(float(w) for w in options.weights)) < 1e-12:
            raise AdapterkitError("--weights sum to zero, so the linear average is undefined; use --method sum")
    return method


def resolve_lsq_defaults(options: MergeOptions, recorded: int, base_name: str = "the base") -> MergeOptions:
    """The options with the ridge and the base-instruction weight filled in for a base recording `recorded`
    instructions: weight DEFAULT_BASE_INSTRUCTIONS_WEIGHT where it records some, else 0; ridge
    BASE_INSTRUCTIONS_RIDGE when they are weighted in, else DEFAULT_RIDGE. Values the user gave are kept."""
    weight = options.base_instructions_weight
    if weight is None:
        weight = DEFAULT_BASE_INSTRUCTIONS_WEIGHT if recorded else 0.0
    elif weight > 0 and not recorded:
        raise AdapterkitError(f"--base-instructions-weight {weight:g} needs a base that records its own instructions "
                              f"(adapterkit_base.json \"instructions\"), and {base_name} records none; drop the option")
    ridge = options.ridge
    if ridge is None:
        ridge = BASE_INSTRUCTIONS_RIDGE if weight > 0 else DEFAULT_RIDGE
    return replace(options, ridge=float(ridge), base_instructions_weight=float(weight))


def resolve_positions(positions: str, adapters: list) -> str:
    """The target rule "auto" stands for: eos+padding when every source (an Adapter) was trained with K/V preservation
    (or is a merge that used eos+padding), else eos, the paper's rows. Constraining the padding directions pays only
    when the sources leave them alone elsewhere; otherwise their targets conflict there (features.py, README)."""
    if positions != "auto":
        return positions

    def preserved(adapter) -> bool:
        if adapter.merge:
            return (adapter.merge.options or {}).get("positions") == "eos+padding"
        return float(adapter.training.get("kv_preservation") or 0) > 0

    return "eos+padding" if all(preserved(a) for a in adapters) else "eos"


def resolve_defaults(options: MergeOptions, method: MergeMethod, recorded: int, adapters: list, base_name: str) -> MergeOptions:
    """Every default that depends on the base (recording `recorded` instructions) or the sources, filled in: least
    squares' ridge and base-instruction weight (resolve_lsq_defaults) and the target positions (resolve_positions)."""
    if method.family == "lsq":
        options = resolve_lsq_defaults(options, recorded, base_name)
    return replace(options, positions=resolve_positions(options.positions, adapters))
