"""Routing an instruction to a bank's task: lexical evidence plus text-encoder similarity, threshold per bank.

Features of a query q against task t (stored instructions S_t):
- lexical: the query's words are stemmed (a light suffix stripper: "noisy" ~ "noise", "cartoonize" ~ "cartoon");
  each word carries its inverse document frequency over a background corpus (the merge's built-in
  regularization prompts, captions and edit instructions of many kinds, plus the bank's own instructions), so
  "make", "the", "image" weigh little and "rain", "noise", "underexposed" much. The task's vector is the mean of
  its instructions' tf-idf vectors (a word in every phrasing of the task weighs more than one in a single
  phrasing); lex(q, t) is the cosine of the query's vector with it, where a query word matches a task word fully
  when the stems are equal and half when one is a prefix (>= 4 letters) of the other ("raindrops" ~ "rain").
- encoder: the best cosine between q's pooled text feature and those of S_t (what routing used alone before).
score(q, t) = (1 - alpha) * lex + alpha * cosine.

Calibration (`calibrate`, run when the bank's tasks change): leave-one-out over the bank's stored instructions.
Each stored instruction, removed from its task, is a positive for that task; its best score among the other
tasks is a negative (an instruction of a task the bank lacked must go to the base). alpha (from a small grid) and
the threshold are those of the best balanced accuracy (threshold halfway between neighbouring scores). The
background prompts are not negatives: they include the usual task phrasings ("derain the image"). An instruction equal to a stored one (case and
spacing ignored) always routes to its task.
"""

from __future__ import annotations

import math
import re

import torch

# The background corpus for word weights: the merge's built-in regularization prompts (a data file; adapters/
# does not import merge/).
BACKGROUND_FILE = ("merge", "reg_prompts.txt")
ALPHAS = (0.0, 0.1, 0.25, 0.5, 1.0)  # encoder weight grid searched per bank
_SUFFIXES = ("izations", "ization", "izing", "ized", "izes", "ize", "ising", "ised", "ise", "ness", "ing", "ed",
             "es", "s", "er", "y", "e")


def read_background() -> list[str]:
    from importlib import resources

    path = resources.files("adapterkit").joinpath(*BACKGROUND_FILE)
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def stem(word: str) -> str:
    """Strip one common English suffix, keeping at least 3 letters ("noisy" -> "nois", "noise" -> "nois")."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _match(a: str, b: str) -> float:
    if a == b:
        return 1.0
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    return 0.5 if len(short) >= 4 and long_.startswith(short) else 0.0


class Router:
    """Scores of instructions against tasks; `calibrate` sets alpha and the threshold from the tasks themselves."""

    def __init__(self, encode, background: list[str]):
        self.encode = encode  # list[str] -> (n, d) unit vectors
        self.background = [b for b in background if b.strip()]
        self.tasks: dict[str, list[str]] = {}
        self._stems: dict[str, set[str]] = {}
        self._features: dict[str, torch.Tensor] = {}
        self._idf: dict[str, float] = {}
        self.alpha, self.threshold = 0.0, 0.5
        self.calibration: dict = {}

    def set_tasks(self, tasks: dict[str, list[str]]) -> None:
        self.tasks = {t: list(i) for t, i in tasks.items() if i}
        self._stems = {t: {stem(w) for text in i for w in words(text)} for t, i in self.tasks.items()}
        self._features = {t: self.encode(i) for t, i in self.tasks.items()}
        docs = [{stem(w) for w in words(text)} for text in self.background + [x for i in self.tasks.values() for x in i]]
        counts: dict[str, int] = {}
        for doc in docs:
            for w in doc:
                counts[w] = counts.get(w, 0) + 1
        self._n_docs = len(docs)
        self._idf = {w: math.log((1 + self._n_docs) / (1 + c)) for w, c in counts.items()}

    def idf(self, w: str) -> float:
        return self._idf.get(w, math.log(1 + self._n_docs))

    def lexical(self, text: str, docs: dict[str, list[set[str]]]) -> dict[str, float]:
        """lex(q, t): cosine of tf-idf vectors, the task's the mean of its instructions' (binary tf), with soft word
        matching (a query word takes its best match among the task's stems). docs: task -> stem set per instruction."""
        query = list(dict.fromkeys(stem(w) for w in words(text)))
        q_norm = math.sqrt(sum(self.idf(w) ** 2 for w in query)) or 1.0
        scores = {}
        for t, sets in docs.items():
            vector: dict[str, float] = {}
            for doc in sets:
                for w in doc:
                    vector[w] = vector.get(w, 0.0) + self.idf(w) / len(sets)
            t_norm = math.sqrt(sum(v * v for v in vector.values())) or 1.0
            dot = sum(self.idf(w) * max((_match(w, s) * v for s, v in vector.items()), default=0.0) for w in query)
            scores[t] = dot / (q_norm * t_norm)
        return scores

    def scores(self, text: str, query=None, exclude=None) -> dict[str, float]:
        """score(q, t) per task; `exclude` (task, index) leaves one stored instruction out (calibration)."""
        query = self.encode([text])[0] if query is None else query
        stems, cosines = {}, {}
        for t, instructions in self.tasks.items():
            keep = [j for j in range(len(instructions)) if exclude is None or (t, j) != exclude]
            if not keep:
                continue
            stems[t] = [{stem(w) for w in words(instructions[j])} for j in keep]
            cosines[t] = float((self._features[t][keep] @ query).max())
        lex = self.lexical(text, stems)
        return {t: (1 - self.alpha) * lex[t] + self.alpha * cosines[t] for t in lex}

    def calibrate(self) -> dict:
        """Leave-one-out alpha and threshold (see the module docstring); returns what it measured."""
        items = [(t, j, text) for t, i in self.tasks.items() for j, text in enumerate(i)]
        if not items:
            return {}
        queries = self.encode([text for _t, _j, text in items])
        best = None
        for alpha in ALPHAS:
            self.alpha = alpha
            pos, neg = [], []
            for k, (t, j, text) in enumerate(items):
                s = self.scores(text, queries[k], exclude=(t, j))
                if t in s:
                    pos.append(s[t])
                others = [v for u, v in s.items() if u != t]
                if others:
                    neg.append(max(others))
            threshold, right = _best_split(pos, neg)
            if best is None or right > best[0]:
                best = (right, alpha, threshold, len(pos), len(neg))
        right, self.alpha, self.threshold, n_pos, n_neg = best
        self.calibration = {"alpha": self.alpha, "threshold": round(self.threshold, 4), "loo_right": right,
                            "loo_positives": n_pos, "loo_negatives": n_neg}
        return self.calibration


def _best_split(pos: list[float], neg: list[float]) -> tuple[float, float]:
    """Threshold maximising balanced accuracy (share of positives >= t plus share of negatives < t, so the larger
    side does not decide alone), halfway between neighbouring scores; ties: the threshold nearest 0.5."""
    values = sorted(set(pos) | set(neg))
    candidates = [values[0] - 1e-6] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + 1e-6]
    best = (0.5, -1.0)
    for t in candidates:
        right = sum(p >= t for p in pos) / max(len(pos), 1) + sum(n < t for n in neg) / max(len(neg), 1)
        if right > best[1] or (right == best[1] and abs(t - 0.5) < abs(best[0] - 0.5)):
            best = (t, right)
    return best
