"""How adapters are JUDGED: `evaluate(...)` (run.py; its docstring states the rules), columns and the output cache
(columns.py), rows (rows.py), metrics (metrics.py), report files (report.py)."""

from .columns import OutputCache, adapter_hash, base_hash
from .run import EvalResult, evaluate

__all__ = ["EvalResult", "OutputCache", "adapter_hash", "base_hash", "evaluate"]
