"""K/V preservation while training (`--kv-preservation w`): keep what the base's attn2 K/V make of other prompts.

Why. An adapter trained on one task sees only that task's instructions, so nothing stops it from changing the K/V
of every prompt: of the empty prompt (two of IP2P's three guidance passes) and of the padding positions after EOS,
whose text features are nearly the same for every prompt (builtin:tiny v2: 87-98% of each instruction's padding
energy lies in the 3-dimensional span of the empty prompt's rows). Such an adapter edits every instruction, the
base's own edits included (-3 to -7 dB on brighter / invert / sepia / blur with the walk-through's adapters), and
two of them cannot be merged without conflict: the part of each task that lives in the shared directions is the
part the tasks' targets fight over (README, "where the paper's merge loses retention").

What. The term added to the IP2P loss is the merge's own regularizer (merge/lsq.py), applied while training:

    w * mean over K/V layers of  tr(dW M dW^T) / tr(W0 M W0^T)

dW (d_out, d_text) is the layer's change from the base (the method's `live_kv_delta`), W0 the base weight and
M = C^T C / n the Gram matrix of the text features of every position of the preservation prompts (C: (n, d_text)),
so each ratio is the relative change of that layer's K/V outputs on those prompts. The prompts are the merge's
built-in regularization prompts (merge/reg_prompts.txt, "" included) minus those that share a word with the task's
own instructions, other than the most common words of that set (the, a, it, make, ...): "a garden in the rain" and
"make it look like a cartoon" are the derain and cartoonize tasks' neighbours, not prompts to keep. Exact (no
sampling: bitwise resume holds) and cheap: one (d_out, d_text) x (d_text, d_text) product per layer and step.

Measured on builtin:tiny v2 (walk-through data, validation rows 64..79 of the eval split; README has the table).
"""

from __future__ import annotations

import torch

from ..adapters.routing import read_background, stem, words
from ..base import cross_attention_kv_layers
from ..inference import text_gram

COMMON_WORD_SHARE = 0.05  # a word in at least this share of the preservation prompts is common: it excludes nothing


def preservation_prompts(instructions: list[str], prompts: list[str] | None = None) -> list[str]:
    """The merge's regularization prompts ("" included) without those that share an uncommon word with
    `instructions`, sorted."""
    prompts = sorted(set(read_background()) | {""}) if prompts is None else list(prompts)
    stems = [{stem(w) for w in words(p)} for p in prompts]
    counts: dict[str, int] = {}
    for doc in stems:
        for w in doc:
            counts[w] = counts.get(w, 0) + 1
    common = {w for w, n in counts.items() if n >= COMMON_WORD_SHARE * len(prompts)}
    own = {stem(w) for text in instructions for w in words(text)} - common
    return [p for p, doc in zip(prompts, stems) if not doc & own]


class KVPreservation:
    """The preservation term for one training run (see the module docstring)."""

    def __init__(self, base, method, options, weight: float, instructions: list[str], device):
        self.method, self.options, self.weight = method, options, float(weight)
        self.prompts = preservation_prompts(instructions)
        # M over every position of the prompts, as the merge's regularization Gram (inference.text_gram)
        self.gram = text_gram(base.pipe.tokenizer, base.pipe.text_encoder, self.prompts)[0].to(device, torch.float32)
        # fp32 copies of the base K/V, taken before training starts (and before a resume loads trained weights)
        self.base_kv = {n: layer.weight.detach().to(device, torch.float32).clone()
                        for n, layer in cross_attention_kv_layers(base.pipe.unet).items()}
        self.scale = {n: 1.0 / float(((w @ self.gram) * w).sum()) for n, w in self.base_kv.items()}  # 1 / tr(W0 M W0^T)

    def loss(self, unet) -> torch.Tensor:
        """w * mean relative change of the K/V outputs on the preservation prompts (a scalar with gradients)."""
        deltas = self.method.live_kv_delta(unet, self.options, self.base_kv)
        terms = [((d @ self.gram) * d).sum() * self.scale[n] for n, d in deltas.items()]
        if not terms:
            return torch.zeros((), device=self.gram.device)
        return self.weight * torch.stack(terms).mean()


class NoPreservation:
    """--kv-preservation 0: nothing added to the loss."""

    @staticmethod
    def loss(unet) -> float:
        return 0.0


def make_preservation(cfg, base, method, options, instructions: list[str], device) -> KVPreservation | NoPreservation:
    """The run's preservation term (NoPreservation when --kv-preservation is 0)."""
    return KVPreservation(base, method, options, cfg.kv_preservation, instructions, device) if cfg.kv_preservation else NoPreservation()
