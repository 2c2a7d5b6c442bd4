"""`adapterkit demo`: the whole loop on the bundled tiny base, in a few minutes on a laptop CPU.

1. write procedural datasets for two held-out tasks (derain, cartoonize) and a held-out eval set;
2. train one adapter per task (derain: LoRA on K/V, cartoonize: Custom Diffusion K/V) with `adapterkit train`'s defaults;
3. merge them by constrained least squares (lsq) and by plain averaging (linear);
4. evaluate base, both adapters and both merges on held-out rows (report.html, grids, report.json);
5. load everything into an AdapterBank, time in-place swaps and route instructions to tasks.

Everything lands in one folder; demo.json gathers the figures and the summary table is printed.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

from ..errors import AdapterkitError
from ..fileio import foreign_entries, write_json



# Each task's adapter method. Everything else is what `adapterkit train` does with no other option: the settings the
# base recommends (builtin:tiny's adapterkit_base.json, `training_defaults`: LoRA rank 128 with lr 3e-3 and cosine
# decay, Custom Diffusion lr 1e-3 constant; both 150 steps of batch 32, AdamW, cached latents), else the plain
# defaults. So the demo shows exactly what the README's walk-through gets (issue 18), and the settings live in one
# place. denoise and lowlight are trained by bench/tiny_tasks.py only.
TASK_METHODS = {"derain": "lora", "cartoonize": "custom-diffusion", "denoise": "lora", "lowlight": "custom-diffusion"}
DEMO_TASKS = {task: TASK_METHODS[task] for task in ("derain", "cartoonize")}
# Instructions never stored in an adapter: routing must generalise to them, or fall back to the base.
ROUTING_PROBES = ("derain the image", "cartoonize it", "please remove the rain", "make it a cartoon drawing",
                  "make it brighter", "invert the colors")


@dataclass(frozen=True)
class DemoSettings:
    base: str = "builtin:tiny"
    train_rows: int = 256  # procedural rows per task
    eval_rows: int = 8  # held-out rows per task (crops of photographs the training never sees)
    train_steps: int | None = None  # optimizer steps per adapter; None: what the base recommends (as `train` does)
    inference_steps: int | None = None  # default: the base's recorded default_steps, else 20
    # The least-squares merge at `adapterkit merge`'s defaults: the paper's exact form on the end-of-text rows of
    # every stored phrasing, plus each phrasing's padding directions since both adapters were trained with the K/V
    # preservation builtin:tiny recommends ("auto", merge/methods.py resolve_positions). builtin:tiny v2's text width
    # (256) holds the two tasks' rows; v1's 32 did not, and the demo used the soft form over all 77 positions instead
    # (issue 18, point 4).
    merge_method: str = "lsq"
    merge_positions: str = "auto"
    merge_prior: str = "base"  # "average": the lsq merge stays near the sources' average off the constraints
    seed: int = 0


def train_task_adapter(base: str, task: str, data: str, output: str, method: str, steps: int | None = None,
                       seed: int = 0, quiet: bool = False, targets: str | None = None):
    """Train one held-out task's adapter on a procedural dataset folder as `adapterkit train --method METHOD` would
    with no other option (the base's recommended settings fill the rest; `targets`: LoRA's --targets, default kv);
    return the Adapter."""
    from ..train import TrainConfig, train
    from .tasks import get_task

    cfg = TrainConfig(
        base=base, data=data, method=method, task=task, output=output, instructions=tuple(get_task(task).instructions),
        steps=steps, validation_steps=0, checkpoint_steps=0, log_with="none", seed=seed, quiet=quiet,
        overwrite=True,  # the demo regenerates its own folder, whatever an older version trained there
        **({"targets": targets} if targets else {}),
    )
    return train(cfg)


def run_demo(output: str = "adapterkit-demo", settings: DemoSettings = DemoSettings(), quiet: bool = False) -> dict:
    """Run the demo into `output`; return the summary that is also written to `output/demo.json`."""
    from ..base import load_base

    started = time.perf_counter()
    _claim_output(output, settings)
    base = load_base(settings.base)
    sampler = base.sampler(steps=settings.inference_steps or None)  # the base's recorded settings (base.py)
    steps, guidance = sampler.steps, {"guidance": sampler.guidance, "image_guidance": sampler.image_guidance}
    phases = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        phases[name] = round(time.perf_counter() - start, 1)
        return result

    folders = timed("data", _write_datasets, output, settings, base.resolution, quiet)
    trained = timed("train", _train_adapters, output, folders, settings, quiet)
    merges, merge_reports = timed("merge", _merge_adapters, output, base, trained, settings, quiet)
    evaluation = timed("eval", _evaluate, output, base, folders["eval"], trained, merges, steps, guidance, settings, quiet)
    bank_figures = timed("bank", _bank_demo, base, trained, merges["lsq"], steps, folders["eval"])
    summary = {
        "base": {"name": settings.base, "fingerprint": base.fingerprint, "resolution": base.resolution},
        "settings": settings.__dict__ | {"inference_steps": steps, **guidance},
        "tasks": _task_summary(evaluation.report, trained, merges),
        "task_measures": _task_measures(output, evaluation.report, settings.seed, base.resolution),
        "phase_seconds": phases,
        "merge": merge_reports,
        "bank": bank_figures,
        "files": {"report_html": evaluation.files.get("html"), "report_json": evaluation.files.get("json"),
                  "grids": evaluation.files.get("grids")},
        "seconds": time.perf_counter() - started,
    }
    write_json(os.path.join(output, "demo.json"), summary)
    return summary


def _claim_output(output: str, settings: DemoSettings) -> None:
    """The demo replaces what data/, adapters/, merges/ and images/ hold in `output` (its adapters with overwrite), so
    it writes only into an absent or empty folder, or an earlier demo's, known by its demo.json, which is written
    first (session 22: `demo --output .` in a project would have replaced the project's own adapters/derain)."""
    summary = os.path.join(output, "demo.json")
    shown = "" if os.path.isfile(summary) else foreign_entries(output)
    if shown:
        raise AdapterkitError(f"{output} holds files that are not an adapterkit demo's ({shown}); the demo writes "
                              "data/, adapters/, merges/ and images/ there, replacing what they hold: choose another "
                              "--output (a new or empty folder, or an earlier demo's)")
    write_json(summary, {"status": "running", "base": settings.base})  # the full summary replaces it at the end


def _write_datasets(output: str, settings: DemoSettings, resolution: int, quiet: bool) -> dict[str, str]:
    """One training folder per task and one eval folder holding both tasks' held-out rows."""
    from .tasks import write_task_dataset

    data = os.path.join(output, "data")
    folders = {}
    for task in DEMO_TASKS:
        folders[task] = write_task_dataset(task, os.path.join(data, f"{task}-train"), n=settings.train_rows,
                                           seed=settings.seed, resolution=resolution, split="train", quiet=quiet)
    folders["eval"] = write_task_dataset(list(DEMO_TASKS), os.path.join(data, "eval"), n=settings.eval_rows,
                                         seed=settings.seed, resolution=resolution, split="eval", quiet=quiet)
    return folders


def _train_adapters(output: str, folders: dict, settings: DemoSettings, quiet: bool):
    return {task: train_task_adapter(settings.base, task, folders[task], os.path.join(output, "adapters", task), method,
                                     settings.train_steps, settings.seed, quiet)
            for task, method in DEMO_TASKS.items()}


def _merge_adapters(output: str, base, trained: dict, settings: DemoSettings, quiet: bool):
    from ..merge import merge

    sources = list(trained.values())
    merges, reports = {}, {}
    for name, method in (("lsq", settings.merge_method), ("linear", "linear")):
        prior = {"prior": settings.merge_prior} if name == "lsq" else {}
        result = merge(sources, base, method=method, positions=settings.merge_positions,
                       output=os.path.join(output, "merges", f"merged-{name}"), task=f"merged-{name}", quiet=quiet, **prior)
        merges[name], reports[name] = result.adapter, result.report
    return merges, reports


def _evaluate(output, base, data, trained, merges, steps, guidance, settings, quiet):
    from ..eval import evaluate

    adapters = [os.path.join(output, "adapters", t) for t in trained]
    adapters += [os.path.join(output, "merges", f"merged-{m}") for m in merges]  # column names = folder names
    return evaluate(base, data, adapters, output, steps=steps, seed=settings.seed, quiet=quiet, **guidance)


def _bank_demo(base, trained: dict, merged, steps: int, eval_folder: str) -> dict:
    """Swap timings (median of 20 in-place activations per adapter) and routing of unseen instructions."""
    from ..adapters.bank import AdapterBank
    from ..inference import open_image

    bank = AdapterBank(base)
    for adapter in trained.values():
        bank.add(adapter)
    bank.add(merged)
    bank.prepare()
    swap_ms = {}
    for task in bank.tasks:
        times = []
        for _ in range(20):
            bank.deactivate()
            start = time.perf_counter()
            bank.activate(task)
            times.append((time.perf_counter() - start) * 1e3)
        swap_ms[task] = statistics.median(times)
    routing = []
    for instruction in ROUTING_PROBES:
        task, score = bank.route(instruction)
        routing.append({"instruction": instruction, "task": task, "cosine": round(score, 3)})
    image = open_image(os.path.join(eval_folder, "input", f"{next(iter(trained))}-00000.png"))
    start = time.perf_counter()
    bank.edit(image, ROUTING_PROBES[0], steps=steps)
    edit_ms = (time.perf_counter() - start) * 1e3
    bank.close()
    return {"swap_ms": swap_ms, "edit_ms": edit_ms, "routing": routing, "route_threshold": bank.route_threshold}


def _task_summary(report: dict, trained: dict, merges: dict) -> dict:
    """Per task: mean PSNR of base / adapter / merges, the adapter's gain and each merge's retention."""
    out = {}
    for task, section in report["tasks"].items():
        psnr = {column: stats["psnr"]["mean"] for column, stats in section["metrics"].items() if "psnr" in stats}
        base_psnr, adapter_psnr = psnr.get("base"), psnr.get(task)
        if base_psnr is None or adapter_psnr is None:
            raise AdapterkitError(f"the demo evaluation has no PSNR for task {task}; see {report.get('output')}")
        gain = adapter_psnr - base_psnr
        row = {"method": trained[task].method, "adapter": adapter_label(trained[task]), "psnr_base": base_psnr,
               "psnr_adapter": adapter_psnr, "gain_db": gain}
        for method in merges:  # retention as eval's merge view computes it (None when the gain is ~0)
            view = section["merges"].get(f"merged-{method}", {})
            row[f"psnr_{method}"] = psnr.get(f"merged-{method}")
            row[f"retention_{method}"] = view.get("psnr_retention")
        out[task] = row
    return out


def _task_measures(output: str, report: dict, seed: int, resolution: int) -> dict:
    """Per task and column, the task's own measure over the saved PNGs (derain: PSNR on the rain pixels of each
    row's streak mask; cartoonize: outline F1), so the figures say whether the task itself was done."""
    import numpy as np

    from ..inference import open_image
    from . import measures
    from .tasks import rain_mask

    def read(folder: str, column: str, row: int) -> np.ndarray:
        return np.asarray(open_image(os.path.join(folder, column, f"{row}.png")))

    scorers = {  # task -> (measure name, score(output, target, row))
        "derain": ("rain_psnr", lambda out, target, row: measures.masked_psnr(out, target, rain_mask(row, seed, resolution))),
        "cartoonize": ("outline_f1", lambda out, target, row: measures.outline_f1(out, target)),
    }
    out = {}
    for task, section in report["tasks"].items():
        if task not in scorers:
            continue
        name, score = scorers[task]
        folder = os.path.join(output, "images", section["folder"])
        rows = sorted(int(file[:-4]) for file in os.listdir(os.path.join(folder, "target")))
        targets = {r: read(folder, "target", r) for r in rows}  # read once, scored against every column
        columns = [c for c in section["metrics"] if os.path.isdir(os.path.join(folder, c))]
        figures = {c: float(np.mean([score(read(folder, c, r), targets[r], r) for r in rows])) for c in columns}
        out[task] = {"measure": name, "columns": figures}
    return out


def format_summary(summary: dict) -> str:
    """The printed summary: one line per task (the adapter as the README's table names it), the task measures, a line
    per phase that has no table (training, merge, hot-swap, routing), the seconds and where the report is."""
    settings = summary["settings"]
    lines = [f"{'task':<11} {'method':<27} {'base':>6} {'adapter':>8} {'gain':>6} {'lsq':>6} {'ret.lsq':>8} "
             f"{'linear':>7} {'ret.lin':>8}"]
    for task, row in summary["tasks"].items():
        lines.append(
            f"{task:<11} {row['adapter']:<27} {row['psnr_base']:6.2f} {row['psnr_adapter']:8.2f} "
            f"{row['gain_db']:+6.2f} {row['psnr_lsq']:6.2f} {_pct(row['retention_lsq']):>8} {row['psnr_linear']:7.2f} "
            f"{_pct(row['retention_linear']):>8}"
        )
    for task, m in summary.get("task_measures", {}).items():
        label = "PSNR on rain pixels (dB)" if m["measure"] == "rain_psnr" else "outline F1"
        lines.append(f"{task} {label}: " + ", ".join(f"{c} {v:.2f}" for c, v in m["columns"].items()))
    bank = summary["bank"]
    swaps = ", ".join(f"{t} {ms:.2f} ms" for t, ms in bank["swap_ms"].items())
    near_average = settings.get("merge_prior", "base") != "base"  # a demo.json written before the option: the paper's
    lines += ["", "PSNR in dB on held-out crops; retention = (merge - base) / (adapter - base); "
              f"lsq = least-squares merge ({settings['merge_method']}, "
              f"{(summary.get('merge') or {}).get('lsq', {}).get('positions') or settings['merge_positions']} "
              "token positions" + (", near the sources' average off the constraints" if near_average else "")
              + "), linear = plain average.",
              (f"training: each adapter first encodes its {settings['train_rows']} rows once (the 'cache latents' bar: "
               "VAE latents and text features, --cache-latents), then takes its optimizer steps on the cache."),
              "merge: " + "; ".join(_merge_line(name, report) for name, report in summary.get("merge", {}).items())
              + ("" if near_average else
                 " (--merge-prior average keeps more of each task, at averaging's cost to other edits: README, merge)"),
              f"hot-swap (median of 20): {swaps}; one edit: {bank['edit_ms']:.0f} ms",
              "routing: " + "; ".join(f"'{r['instruction']}' -> {r['task'] or 'base'} ({r['cosine']:.2f})" for r in bank["routing"]),
              "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["phase_seconds"].items())
              + f"; {summary['seconds']:.0f} in all",
              f"report: {summary['files']['report_html']}", *_next_steps(summary)]
    return "\n".join(lines)


def _next_steps(summary: dict) -> list[str]:
    """What to try next with the demo's adapters: an edit of your own picture, and the web page."""
    adapters = os.path.join(os.path.dirname(summary["files"]["report_html"]), "adapters")
    base = summary["settings"].get("base", "builtin:tiny")
    return ["", f"next: adapterkit edit --base {base} --adapter {adapters}/derain --adapter {adapters}/cartoonize "
                'YOUR.jpg --instruction "remove the rain" --output edited.png',
            f"      adapterkit serve --base {base} --adapter-dir {adapters}  (the [serve] extra; then open "
            "http://127.0.0.1:8000/)"]


def adapter_label(adapter) -> str:
    """'LoRA r128 on K/V, 150 steps' / 'Custom Diffusion, 150 steps': how the adapter was trained (its adapter.json)."""
    name = _METHOD_LABELS.get(adapter.method, adapter.method)
    rank = adapter.rank  # None for full-weight methods (Custom Diffusion)
    if rank is not None:
        from ..base import is_cross_attention_kv

        name += f" r{rank}" + (" on K/V" if all(is_cross_attention_kv(path) for path in adapter.targets) else "")
    steps = adapter.training.get("steps_done")
    return f"{name}, {steps} steps" if steps else name


# Display names only; no method code here.
_METHOD_LABELS = {"lora": "LoRA", "custom-diffusion": "Custom Diffusion"}


_MERGE_LABELS = {"linear": "plain average", "lsq": "exact least squares"}


def _merge_line(name: str, report: dict) -> str:
    """'lsq = exact least squares over 56 constraint rows, drift 0.048, 0.12 s' from a merge report."""
    rows = f" over {report['constraint_rows']} constraint rows" if report.get("constraint_rows") else ""
    method = _MERGE_LABELS.get(report["method"], report["method"])
    if report.get("prior", "base") != "base":
        method += " near the sources' average"
    reg = report.get("regularization") or {}
    own = f" and the base's instructions x{reg['base_instructions_weight']:g}" if reg.get("base_instructions") else ""
    return (f"{name} = {method}{rows}, drift on regularization prompts{own} {report['drift']:.3f}, "
            f"{report['time_s']['total']:.2f} s")


def _pct(value) -> str:
    from ..eval.report import format_retention

    return format_retention(value)
