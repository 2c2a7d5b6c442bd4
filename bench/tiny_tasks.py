"""The bundled base's task table: four held-out tasks learned by adapters, merged, routed (issue 12's figures).

    python bench/tiny_tasks.py                 # all four tasks, 16 held-out rows each (~15-25 min on 2 cores)
    python bench/tiny_tasks.py --rows 4 --steps 2 --tasks derain cartoonize   # a smoke run
    python bench/tiny_tasks.py --tasks derain cartoonize --lora-targets attn    # LoRA on every attention projection

For each of derain, cartoonize, denoise and lowlight: train the task's adapter with its method
(`adapterkit.demo.run.TASK_METHODS`) and the base's recommended settings, as `adapterkit train` does with no other
option, on 256 procedural training rows; on held-out rows (crops of photographs
training never sees) score the base, the adapter, the least-squares merge at adapterkit's defaults
(`merge(..., method="lsq")`: exact constraints at positions 1..EOS of every stored phrasing), the same near the
sources' average (`prior="average"`, lsq-avg) and the plain average (linear), for the demo's two tasks and for all
four; and what each merge does to four of the base's general edits. Columns: PSNR and SSIM to the target, the task's own
measure (derain: PSNR on the rain pixels; cartoonize: outline F1), retention = (merge - base) / (adapter - base)
with its 95% interval over the rows (paired bootstrap: 16 rows leave it wide); not applicable, with the reason, where
the adapter's own gain is not above the rows' noise (the rule of `adapterkit eval`). One more column, text-only: the
adapter on the instruction's guidance branch only, the two empty-prompt branches at the base's K/V: what a merge
that keeps the empty prompt at the base (as the paper's does) can keep at most.
Rows are scored twice: with stored phrasings, and with phrasings never stored in any adapter ("unseen").
Routing: >= 40 probe instructions (unseen phrasings of the four tasks, general edits, unrelated text) through an
AdapterBank holding the four adapters; a probe is right when it reaches its task, or the base for the others.
Prints JSON, then tables.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/common.py

from common import emit, machine  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _base_kv(unet) -> dict:
    """name -> a copy of the base's attn2 to_k / to_v weight (d_out, d_text), taken before any adapter is active."""
    from adapterkit.base import cross_attention_kv_layers

    return {name: layer.weight.detach().clone() for name, layer in cross_attention_kv_layers(unet).items()}


@contextlib.contextmanager
def _text_branch_only(unet, base_kv: dict):
    """While active, the two empty-prompt guidance branches get the base's K/V, the instruction's branch the active
    adapter's. IP2P's pipeline stacks its text features as [instruction x B, "" x B, "" x B] (image+text, image only,
    neither), so rows B.. of every attn2 K/V input are the empty prompt's. An adapter scored this way keeps what a
    merge can keep at most when it reproduces the adapter on the instruction's rows and leaves the empty prompt at
    the base, as the paper's merge does (the empty prompt is a regularization prompt)."""
    def hook(name):
        def replace(_module, args, out):
            rows = args[0].shape[0] // 3
            out = out.clone()
            out[rows:] = torch.nn.functional.linear(args[0][rows:], base_kv[name])  # attn2 K/V carry no bias in SD
            return out
        return replace

    # Registered after activation: a LoRA swap puts peft's layers in place of the plain Linear modules.
    handles = [module.register_forward_hook(hook(name)) for name, module in unet.named_modules() if name in base_kv]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _score_rows(bank, task_key, examples, task, cfg, masks, base_kv=None) -> dict:
    """Edit `examples` with `task_key` active (None: the base) in batches; mean PSNR, SSIM and the task measure.
    With `base_kv`, the adapter acts on the instruction's guidance branch only (_text_branch_only)."""
    from PIL import Image

    from adapterkit.demo import measures
    from adapterkit.eval.metrics import psnr, ssim

    bank.activate(task_key)
    outputs = []
    for start in range(0, len(examples), 8):
        batch = examples[start : start + 8]
        branch = _text_branch_only(bank.pipe.unet, base_kv) if base_kv is not None else contextlib.nullcontext()
        with torch.no_grad(), branch:
            out = bank.pipe(prompt=[e.instruction for e in batch], image=[Image.fromarray(e.input) for e in batch],
                            num_inference_steps=cfg["steps"], guidance_scale=cfg["guidance"],
                            image_guidance_scale=cfg["image_guidance"], output_type="np",
                            generator=torch.Generator("cpu").manual_seed(start)).images
        outputs += [np.round(np.clip(o, 0, 1) * 255).astype(np.uint8) for o in out]
    per_row = [psnr(o, e.target) for o, e in zip(outputs, examples)]
    row = {"psnr": float(np.mean(per_row)), "psnr_rows": [float(v) for v in per_row],
           "ssim": float(np.mean([ssim(o, e.target) for o, e in zip(outputs, examples)]))}
    if masks is not None:  # the task's own pixels (derain: the rain streaks; bench/fresh_tasks: desnow's flakes)
        key = "rain_psnr" if task == "derain" else "mask_psnr"
        row[key] = float(np.mean([measures.masked_psnr(o, e.target, m) for o, e, m in zip(outputs, examples, masks)]))
    if task == "cartoonize":
        row["outline_f1"] = float(np.mean([measures.outline_f1(o, e.target) for o, e in zip(outputs, examples)]))
    return row


# Column label -> (merge method, options): the default (the paper's exact lsq), lsq near the sources' average
# (--prior average), and the plain average.
MERGES = {"lsq": ("lsq", {}), "lsq-avg": ("lsq", {"prior": "average"}), "linear": ("linear", {})}
GENERAL_PROBES = ("brighter", "invert", "sepia", "blur")  # what each merge does to the base's own edits


def _retention_note(adapter: list, base: list) -> str | None:
    """Why retention means nothing for this task's adapter (its per-row gain not above the rows' noise: the rule
    `adapterkit eval` applies, eval/report.py retention_not_applicable), or None."""
    from adapterkit.eval.metrics import summarise
    from adapterkit.eval.report import retention_not_applicable

    return retention_not_applicable(summarise([a - b for a, b in zip(adapter, base)]))


def _retention(merged: list, adapter: list, base: list) -> float | None:
    """(merge - base) / (adapter - base) on the rows' mean PSNR; None where `_retention_note` gives a reason."""
    if _retention_note(adapter, base) is not None:
        return None
    return (float(np.mean(merged)) - float(np.mean(base))) / (float(np.mean(adapter)) - float(np.mean(base)))


def _retention_interval(merged: list, adapter: list, base: list, draws: int = 2000) -> list | None:
    """95% interval of the retention over the rows: the same rows resampled for all three columns (paired bootstrap,
    seeded), percentiles of the ratio; None when retention is not applicable or a resample's gain is not positive."""
    m, a, b = (np.asarray(x, dtype=np.float64) for x in (merged, adapter, base))
    index = np.random.default_rng(0).integers(0, len(b), size=(draws, len(b)))
    gain = a[index].mean(1) - b[index].mean(1)
    if _retention_note(adapter, base) is not None or (gain <= 0).any():
        return None
    ratio = (m[index].mean(1) - b[index].mean(1)) / gain
    return [float(np.percentile(ratio, 2.5)), float(np.percentile(ratio, 97.5))]


def add_retention(scores: dict, adapter: str, columns: list[str]) -> dict:
    """Give each of `columns` its retention of the `adapter` column's gain over "base", the reason when that means
    nothing, and its 95% interval; returns `scores`."""
    a, b = scores[adapter]["psnr_rows"], scores["base"]["psnr_rows"]
    for column in columns:
        s = scores[column]
        s["retention"], s["retention_note"] = _retention(s["psnr_rows"], a, b), _retention_note(a, b)
        s["retention_95"] = _retention_interval(s["psnr_rows"], a, b)
    return scores


def run(tasks_: list[str], rows: int, steps_override: int | None, base_name: str, work: str, quiet: bool,
        lora_targets: str | None = None) -> dict:
    from adapterkit import AdapterBank, load_base, merge
    from adapterkit.demo import tasks
    from adapterkit.demo.run import TASK_METHODS, train_task_adapter
    from adapterkit.errors import AdapterkitError

    base = load_base(base_name)
    cfg = base.sampler().options()  # the base's recorded steps and guidance, as eval and edit use them
    timings, adapters = {}, {}
    for task in tasks_:
        start = time.perf_counter()
        folder = tasks.write_task_dataset(task, os.path.join(work, f"{task}-train"), n=256, resolution=base.resolution, quiet=True)
        method = "lora" if lora_targets else TASK_METHODS[task]  # --lora-targets: every task a LoRA on those modules
        adapters[task] = train_task_adapter(base_name, task, folder, os.path.join(work, "adapters", task),
                                            method, steps=steps_override, quiet=quiet, targets=lora_targets)
        timings[f"train_{task}"] = round(time.perf_counter() - start, 1)
    groups = {"two": tasks_[:2], "all": tasks_} if len(tasks_) > 2 else {"two": tasks_}
    merged, refused = {}, {}
    for group, names in groups.items():
        for label, (method, options) in MERGES.items():
            key = f"{label}-{group}"
            try:
                result = merge([adapters[t] for t in names], base, method=method, task=key, quiet=True,
                               as_lora=bool(lora_targets), **options)  # modules beyond K/V need a LoRA output
            except AdapterkitError as e:  # exact lsq refuses when rows exceed the text width (builtin:tiny v1: 32)
                refused[key] = str(e)
                continue
            merged[key] = (result.adapter, names)
    base_kv = _base_kv(base.pipe.unet)
    bank = AdapterBank(base)
    for adapter in list(adapters.values()) + [m for m, _ in merged.values()]:
        bank.add(adapter)
    bank.prepare()
    table = {}
    for task in tasks_:
        for phrasing in ("stored", "unseen"):
            examples = tasks.make_examples(task, rows, resolution=base.resolution, split="eval", unseen=phrasing == "unseen")
            masks = [tasks.rain_mask(i, resolution=base.resolution) for i in range(rows)] if task == "derain" else None
            columns = {"base": None, "adapter": task} | {k: k for k, (_, names) in merged.items() if task in names}
            scores = {c: _score_rows(bank, key, examples, task, cfg, masks) for c, key in columns.items()}
            if not lora_targets:  # K/V swapped per branch: says nothing of an adapter on other modules too
                scores["text-only"] = _score_rows(bank, task, examples, task, cfg, masks, base_kv)
            table[f"{task}/{phrasing}"] = add_retention(scores, "adapter", [c for c in scores if c not in ("base", "adapter")])
    general = {}  # the merges' cost: PSNR change of general edits (8 held-out rows each) with the merge active
    for edit in GENERAL_PROBES:
        examples = tasks.make_examples(edit, 8, resolution=base.resolution, split="eval")
        alone = _score_rows(bank, None, examples, edit, cfg, None)["psnr"]
        general[edit] = {"base": alone, **{k: _score_rows(bank, k, examples, edit, cfg, None)["psnr"] - alone for k in merged}}
    bank.close()
    routing_bank = AdapterBank(base)  # routing targets: the task adapters only (a merge stores every task's phrasings)
    for adapter in adapters.values():
        routing_bank.add(adapter)
    routing = route_probes(routing_bank, [(p, t) for t in tasks_ for p in tasks.TASKS[t].unseen_instructions])
    routing_bank.close()
    return {"bench": "tiny_tasks", "machine": machine(), "base": base_name, "lora_targets": lora_targets,
            "rows_per_task": rows, "sampler": cfg,
            "seconds": timings, "scores": table, "general_edits": general, "merges_refused": refused, "routing": routing}


def route_probes(bank, task_probes: list[tuple[str, str]]) -> dict:
    """Route `task_probes` ((never-stored phrasing, its task)) plus the probes that belong to the base: never-stored
    phrasings of the 16 general edits, stored phrasings of 8 of them and unrelated text. Used by bench/fresh_tasks.py
    too."""
    from adapterkit.demo import tasks

    probes = list(task_probes)
    probes += [(p, None) for t in tasks.GENERAL_TASKS for p in tasks.TASKS[t].unseen_instructions]
    probes += [(tasks.TASKS[t].instructions[0], None) for t in tasks.GENERAL_TASKS[:8]]
    probes += [(p, None) for p in tasks.UNRELATED_INSTRUCTIONS]
    rows = []
    for text, expected in probes:
        got, score = bank.route(text)
        rows.append({"instruction": text, "expected": expected or "base", "routed": got or "base",
                     "score": round(float(score), 3), "right": got == expected})
    right = sum(r["right"] for r in rows)
    return {"probes": len(rows), "right": right, "accuracy": right / len(rows), "threshold": bank.route_threshold,
            "calibration": bank.route_details(probes[0][0])["calibration"], "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="builtin:tiny")
    parser.add_argument("--tasks", nargs="+", default=["derain", "cartoonize", "denoise", "lowlight"])
    parser.add_argument("--rows", type=int, default=16, help="held-out rows per task")
    parser.add_argument("--steps", type=int, help="override the recommended optimizer steps (smoke runs)")
    parser.add_argument("--work", help="folder for datasets and adapters (default: a temporary folder)")
    parser.add_argument("--lora-targets", choices=["attn"], help="train every task as a LoRA on these modules "
                        "(train --targets; attn: every attention projection) instead of its method on K/V")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.tasks, args.rows, args.steps, args.base, args.work or tmp, args.quiet, args.lora_targets)
    table = []
    for key, scores in result["scores"].items():
        for column, s in scores.items():
            table.append({"task/phrasing": key, "column": column, "psnr": s["psnr"], "ssim": s["ssim"],
                          "rain_psnr": s.get("rain_psnr"), "outline_f1": s.get("outline_f1"),
                          "retention": s.get("retention"),
                          "retention_95": "" if not s.get("retention_95") else
                          "{:.0%}..{:.0%}".format(*s["retention_95"])})
    emit(result, table, ["task/phrasing", "column", "psnr", "ssim", "rain_psnr", "outline_f1", "retention", "retention_95"])
    print("\ngeneral edits with each merge active, PSNR change (dB) from the base's own edit (8 held-out rows each):")
    for edit, row in result["general_edits"].items():
        print(f"  {edit:<10} base {row['base']:.2f}  " + "  ".join(f"{k} {v:+.2f}" for k, v in row.items() if k != "base"))
    notes = {key: s["retention_note"] for key, scores in result["scores"].items() for s in scores.values()
             if s.get("retention_note")}
    for key, note in notes.items():
        print(f"\nretention not applicable for {key}: {note}")
    for key, reason in result["merges_refused"].items():
        print(f"\nmerge {key} refused: {reason}")
    r = result["routing"]
    print(f"\nrouting: {r['right']} of {r['probes']} probes right ({100 * r['accuracy']:.0f}%), threshold {r['threshold']}")
    for row in r["rows"]:
        if not row["right"]:
            print(f"  wrong: '{row['instruction']}' -> {row['routed']} (expected {row['expected']}, score {row['score']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
