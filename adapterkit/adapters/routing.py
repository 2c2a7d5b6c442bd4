"""Routing an instruction to a bank's task: lexical evidence plus text-encoder similarity, threshold per bank.

Features of a query q against task t (stored instructions S_t):
- lexical: the query's words, function words dropped (FUNCTION_WORDS), are stemmed (a light suffix stripper:
  "noisy" ~ "noise", "cartoonize" ~ "cartoon"); each word carries its inverse document frequency over a background
  corpus (the merge's built-in regularization prompts, captions and edit instructions of many kinds, plus the bank's
  own instructions), so "make", "image" weigh little and "rain", "noise", "underexposed" much. The task's vector is the mean of
  its instructions' tf-idf vectors (a word in every phrasing of the task weighs more than one in a single
  phrasing; minus beta x the word's largest share in another task); lex(q, t) is the cosine of the query's vector
  with it, where a query word matches a task word fully when the stems are equal and half when one (>= 4 letters)
  ends the other after a prefix of >= 2 letters ("denoise" ~ "noise"; not "grain" ~ "rain", "rainbow" ~ "rain").
  A compound of two known words (stems of the background and the bank) is split first: "raindrops" -> rain, drops.
- encoder: the best cosine between q's pooled text feature and those of S_t (what routing used alone before).
score(q, t) = (1 - alpha) * lex + alpha * cosine.

Calibration (`calibrate`, run when the bank's tasks change): leave-one-out over the bank's stored instructions.
Each stored instruction, removed from its task, is a positive for that task; its best score among the other
tasks is a negative (an instruction of a task the bank lacked must go to the base), leaving out tasks that store
the same instruction (a merged adapter keeps its sources' phrasings: that match is no confusion). alpha and beta (small grids)
and the threshold are those of the best balanced accuracy (threshold halfway between neighbouring scores). The
background prompts are not negatives: they include the usual task phrasings ("derain the image"). Cost: one
pass over the stored instructions per beta (50 tasks x 5 instructions: ~7 s on one CPU thread), run lazily on the
first route after the tasks change. An instruction equal to a stored one (case and
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
BETAS = (0.0, 0.5, 1.0)  # weight of other tasks' word shares subtracted from a task's (Rocchio's negative centroid)
# Function words (articles, pronouns, prepositions and particles, conjunctions, forms of be / do / have) name no
# edit, yet the background corpus is small and made of captions and edit phrasings, so a particle it rarely holds
# ("out": 2 of 684 prompts) weighed like a task's own word: "zoom out a little", "make it out of focus" and "even
# out the surfaces" went to a desnow adapter storing "take out the snow" (bench/fresh_tasks.py, routing 36 of 44;
# 39 without them, builtin:tiny's four tasks unchanged at 44 of 48). Words of quantity or negation ("more", "less",
# "few", "only", "not") stay: they tell edits apart.
FUNCTION_WORDS = frozenset("""
a an the this that these those it its i me my we us our you your he him his she her they them their
of in on at to from by with without into onto out up down off over under about around through across along
away back upon within and or but nor so as than then if
is are was were be been being am do does did have has had
""".split())
_SUFFIXES = ("izations", "ization", "izing", "ized", "izes", "ize", "ising", "ised", "ise", "ness", "ish", "ist", "ing",
             "ed", "es", "s", "er", "y", "e")


def read_background() -> list[str]:
    from importlib import resources

    path = resources.files("adapterkit").joinpath(*BACKGROUND_FILE)
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def content_words(text: str) -> list[str]:
    """`words` without FUNCTION_WORDS: what the lexical score compares."""
    return [w for w in words(text) if w not in FUNCTION_WORDS]


def stem(word: str) -> str:
    """Strip one common English suffix, keeping at least 3 letters ("noisy" -> "nois", "noise" -> "nois")."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def split_compound(word: str, vocabulary: set[str]) -> list[str]:
    """A compound of two known words split in two ("raindrops" -> rain, drops; "snowfall" -> snow, fall), each part
    >= 4 letters with its stem in `vocabulary`; else [word]. An affix keeps its word whole ("derain")."""
    for i in range(4, len(word) - 3):
        if stem(word[:i]) in vocabulary and stem(word[i:]) in vocabulary:
            return [word[:i], word[i:]]
    return [word]


def _match(a: str, b: str) -> float:
    """1 for equal stems, 0.5 when one (>= 4 letters) ends the other after a prefix of >= 2 letters ("rain" in
    "derain", "noise" in "denoise", "light" in "lowlight"). A single spare letter makes another word ("grain",
    "brain", "train"), and so does an ending after the word: "rainbow", "snowman", "lightning", "lighten" (until
    session 23 these half-matched derain, desnow and lowlight; the stemmer strips the endings that keep the meaning:
    "noisy", "cartoonish", "cartoonist")."""
    if a == b:
        return 1.0
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    return 0.5 if len(short) >= 4 and long_.endswith(short) and len(long_) - len(short) >= 2 else 0.0


class Router:
    """Scores of instructions against tasks; `calibrate` sets alpha, beta and the threshold from the tasks themselves."""

    def __init__(self, encode, background: list[str]):
        self.encode = encode  # list[str] -> (n, d) unit vectors
        self.background = [b for b in background if b.strip()]
        self.tasks: dict[str, list[str]] = {}
        self._docs: dict[str, list[set[str]]] = {}  # task -> stem set of each stored instruction
        self._frac: dict[str, dict[str, float]] = {}  # task -> stem -> share of its instructions holding it
        self._features: dict[str, torch.Tensor] = {}
        self._idf: dict[str, float] = {}
        self._vocabulary: set[str] = set()  # stems of the background and the tasks: what compounds split into
        self._n_docs = 1
        self._vectors: dict = {}  # beta -> task vectors (_task_vectors)
        self.alpha, self.beta, self.threshold = 0.0, 0.0, 0.5
        self.calibration: dict = {}

    def stems(self, text: str) -> list[str]:
        """The stems the lexical score compares: content words, compounds of two known words split."""
        return [stem(part) for w in content_words(text) for part in split_compound(w, self._vocabulary)]

    def set_tasks(self, tasks: dict[str, list[str]]) -> None:
        self.tasks = {t: list(i) for t, i in tasks.items() if i}
        texts = self.background + [text for i in self.tasks.values() for text in i]
        self._vocabulary = {stem(w) for text in texts for w in content_words(text)}
        self._docs = {t: [set(self.stems(text)) for text in i] for t, i in self.tasks.items()}
        self._frac = {t: _shares(docs) for t, docs in self._docs.items()}
        self._features = {t: self.encode(i) for t, i in self.tasks.items()}
        docs = [set(self.stems(text)) for text in self.background] + [d for ds in self._docs.values() for d in ds]
        counts: dict[str, int] = {}
        for doc in docs:
            for w in doc:
                counts[w] = counts.get(w, 0) + 1
        self._n_docs = len(docs)
        self._idf = {w: math.log((1 + self._n_docs) / (1 + c)) for w, c in counts.items()}
        self._vectors = {}

    def idf(self, w: str) -> float:
        return self._idf.get(w, math.log(1 + self._n_docs))

    def _vector(self, frac: dict[str, float], other: dict[str, float], beta: float) -> tuple[dict[str, float], float]:
        """A task's weights: idf x (share of its instructions - beta x the largest share in another task), >= 0."""
        vector = {w: self.idf(w) * max(0.0, f - beta * other.get(w, 0.0)) for w, f in frac.items()}
        vector = {w: v for w, v in vector.items() if v > 0}
        return vector, math.sqrt(sum(v * v for v in vector.values())) or 1.0

    def _task_vectors(self, beta: float) -> dict:
        """task -> (vector, norm, other-share table), cached per beta until the tasks change."""
        if beta not in self._vectors:
            out = {}
            for t, frac in self._frac.items():
                other: dict[str, float] = {}
                for u, f in self._frac.items():
                    if u != t:
                        for w, share in f.items():
                            other[w] = max(other.get(w, 0.0), share)
                out[t] = (*self._vector(frac, other, beta), other)
            self._vectors[beta] = out
        return self._vectors[beta]

    def parts(self, text: str, query=None, exclude=None, beta: float | None = None) -> tuple[dict, dict]:
        """(lex, cosine) per task. lex: cosine of the query's tf-idf vector with the task's, a query word taking its
        best match among the task's stems. `exclude` (task, index) leaves one stored instruction out (calibration;
        the other tasks keep their full vectors)."""
        query = self.encode([text])[0] if query is None else query
        vectors = dict(self._task_vectors(self.beta if beta is None else beta))
        q_words = list(dict.fromkeys(self.stems(text)))
        q_norm = math.sqrt(sum(self.idf(w) ** 2 for w in q_words)) or 1.0
        lex, cosines = {}, {}
        for t, (vector, norm, other) in vectors.items():
            keep = list(range(len(self.tasks[t])))
            if exclude is not None and exclude[0] == t:
                keep.remove(exclude[1])
                if not keep:
                    continue
                vector, norm = self._vector(_shares([self._docs[t][j] for j in keep]), other, self.beta if beta is None else beta)
            dot = sum(self.idf(w) * max((_match(w, s) * v for s, v in vector.items()), default=0.0) for w in q_words)
            lex[t] = dot / (q_norm * norm)
            cosines[t] = float((self._features[t][keep] @ query).max())
        return lex, cosines

    def scores(self, text: str, query=None, exclude=None) -> dict[str, float]:
        """score(q, t) = (1 - alpha) lex + alpha cosine, per task."""
        lex, cosines = self.parts(text, query, exclude)
        return {t: (1 - self.alpha) * lex[t] + self.alpha * cosines[t] for t in lex}

    def calibrate(self) -> dict:
        """Leave-one-out alpha, beta and threshold (see the module docstring); returns what it measured."""
        items = [(t, j, text) for t, i in self.tasks.items() for j, text in enumerate(i)]
        if not items:
            return {}
        queries = self.encode([text for _t, _j, text in items])
        # Tasks that store the same instruction are not confusions: a merged adapter keeps its sources' phrasings,
        # and counting its exact match as a negative pushed the demo's threshold to 0.09 ("make it brighter" went
        # to cartoonize with a score of 0.10).
        stored = {t: {normalise_instruction(i) for i in texts} for t, texts in self.tasks.items()}
        holders = [{u for u, keys in stored.items() if normalise_instruction(text) in keys} for _t, _j, text in items]
        best = None
        for beta in BETAS:
            parts = [self.parts(text, queries[k], exclude=(t, j), beta=beta) for k, (t, j, text) in enumerate(items)]
            for alpha in ALPHAS:
                pos, neg = [], []
                for (t, _j, _text), (lex, cos), shared in zip(items, parts, holders):
                    s = {u: (1 - alpha) * lex[u] + alpha * cos[u] for u in lex}
                    if t in s:
                        pos.append(s[t])
                    others = [v for u, v in s.items() if u != t and u not in shared]
                    if others:
                        neg.append(max(others))
                threshold, right = _best_split(pos, neg)
                if best is None or right > best[0]:
                    best = (right, alpha, beta, threshold, len(pos), len(neg))
        right, self.alpha, self.beta, self.threshold, n_pos, n_neg = best
        self.calibration = {"alpha": self.alpha, "beta": self.beta, "threshold": round(self.threshold, 4),
                            "loo_balanced_accuracy": round(right / 2, 4), "loo_positives": n_pos, "loo_negatives": n_neg}
        return self.calibration


def normalise_instruction(text: str) -> str:
    """Case and spacing ignored, as the bank's exact-match rule compares instructions."""
    return " ".join(text.lower().split())


def _shares(docs: list[set[str]]) -> dict[str, float]:
    """stem -> share of the documents holding it."""
    shares: dict[str, float] = {}
    for doc in docs:
        for w in doc:
            shares[w] = shares.get(w, 0.0) + 1.0 / len(docs)
    return shares


def _best_split(pos: list[float], neg: list[float]) -> tuple[float, float]:
    """Threshold maximising balanced accuracy (share of positives >= t plus share of negatives < t, so the larger
    side does not decide alone), halfway between neighbouring scores; ties: the threshold nearest 0.5."""
    values = sorted(set(pos) | set(neg))
    if not values:  # one task storing one instruction: nothing to leave out, so no evidence; the neutral 0.5
        return 0.5, 0.0
    candidates = [values[0] - 1e-6] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + 1e-6]
    best = (0.5, -1.0)
    for t in candidates:
        right = sum(p >= t for p in pos) / max(len(pos), 1) + sum(n < t for n in neg) / max(len(neg), 1)
        if right > best[1] or (right == best[1] and abs(t - 0.5) < abs(best[0] - 0.5)):
            best = (t, right)
    return best
