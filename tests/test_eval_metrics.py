"""eval metrics against independent implementations (scikit-image, scipy), and the task/row/column rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from adapterkit.adapters import Adapter
from adapterkit.errors import AdapterkitError
from adapterkit.eval.columns import _merge_tasks, build_columns, safe_name
from adapterkit.eval.rows import select_task_rows
from adapterkit.eval import metrics as M
from adapterkit.eval.report import merge_view, summarise_task


def _noisy_pair(seed: int, shape=(64, 48, 3), noise=40):
    rng = np.random.RandomState(seed)
    a = (rng.rand(*shape) * 255).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.randint(-noise, noise + 1, a.shape), 0, 255).astype(np.uint8)
    return a, b


def skimage_ssim(a, b):
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1)


@pytest.mark.parametrize("seed,shape,noise", [(0, (64, 48, 3), 40), (1, (11, 30, 3), 5), (2, (33, 33, 3), 120)])
def test_psnr_ssim_l1_equal_scikit_image(seed, shape, noise):
    a, b = _noisy_pair(seed, shape, noise)
    assert M.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-9)
    assert M.ssim(a, b) == pytest.approx(skimage_ssim(a, b), abs=1e-9)
    assert M.l1(a, b) == pytest.approx(np.abs(a / 255.0 - b / 255.0).mean(), abs=1e-12)


def test_identical_images_score_max_psnr_and_ssim_one():
    a, _ = _noisy_pair(3)
    assert M.psnr(a, a) == M.MAX_PSNR
    assert M.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert M.l1(a, a) == 0.0


def test_metric_input_errors():
    a, _ = _noisy_pair(4, (10, 20, 3))
    with pytest.raises(AdapterkitError, match="at least 11x11"):
        M.ssim(a, a)
    b, _ = _noisy_pair(5, (12, 20, 3))
    with pytest.raises(AdapterkitError, match="cannot compare"):
        M.psnr(a, b)
    with pytest.raises(TypeError, match="8-bit"):
        M.psnr(a.astype(np.float32), a.astype(np.float32))


def test_t_quantile_and_interval_match_scipy():
    from scipy import stats

    for df in list(range(1, 40)) + [50, 100, 1000]:
        assert M.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4)
    values = [12.0, 13.5, 11.25, 14.0, 12.75]
    summary = M.summarise(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert summary["n"] == 5 and summary["mean"] == pytest.approx(np.mean(values))
    assert summary["ci95"] == pytest.approx([low, high], abs=1e-4)
    assert M.summarise([3.0]) == {"mean": 3.0, "ci95": None, "n": 1}
    assert M.summarise([]) == {"mean": None, "ci95": None, "n": 0}


def test_clip_similarities_on_known_vectors():
    x = torch.tensor([1.0, 0.0, 0.0])
    y = torch.nn.functional.normalize(torch.tensor([1.0, 1.0, 0.0]), dim=0)
    assert M.clip_image_similarity(x, y) == pytest.approx(2**-0.5)
    # image moved along (y - x); a text direction along the same vector scores 1, the opposite -1
    assert M.clip_directional_similarity(x, y, 3 * (y - x)) == pytest.approx(1.0)
    assert M.clip_directional_similarity(x, y, x - y) == pytest.approx(-1.0)
    assert M.clip_directional_similarity(x, x, y) == 0.0  # no change at all


def test_lpips_is_skipped_with_a_reason_when_unavailable():
    scorer, reason = M.load_lpips()
    try:
        import lpips  # noqa: F401
    except ImportError:
        assert scorer is None and reason.startswith("skipped: the lpips package is not installed")
    else:
        assert (scorer is None) == (reason is not None)


def test_select_task_rows_rules():
    texts = ["derain the image", "remove the rain", "denoise the image", "make it cartoon", "deblur and denoise"]
    matched = select_task_rows(texts, ["derain", "denoise"], "auto")
    assert matched == {"derain": [0, 1], "denoise": [2]}  # "deblur and denoise" is two tasks: neither
    assert select_task_rows(texts, ["derain", "denoise"], "all") == {"derain": [0, 1, 2, 3, 4], "denoise": [0, 1, 2, 3, 4]}
    # one evaluated task on a multi-task dataset: its own rows only
    assert select_task_rows(texts, ["derain"], "auto") == {"derain": [0, 1]}
    # one task on a single-task dataset whose instructions never name it: every row
    single = ["make it pop", "give it punch", "more vivid please"]
    assert select_task_rows(single, ["vivid"], "auto") == {"vivid": [0, 1, 2]}
    assert select_task_rows(single, ["vivid"], "match") == {"vivid": [2]}


def _adapter(task, path=None, merge=None):
    kv = {"down.attn2.to_k": torch.zeros(2, 2)}
    return Adapter(method="custom-diffusion", task=task, instructions=[f"{task} the image"], tensors=kv,
                   extra={"merge": merge} if merge else {}, path=path)


def test_columns_tasks_and_names(tmp_path):
    sources = [{"task": "derain", "path": "/x/derain"}, "runs/denoise", {"task": "lowlight"}]
    merged = _adapter("merged", path=str(tmp_path / "my merge"), merge={"method": "lsq", "sources": sources})
    columns, tasks = build_columns([_adapter("derain", path="/a/derain"), _adapter("base", path="/a/base"),
                                    _adapter("derain", path="/b/derain"), merged])
    assert [c.name for c in columns] == ["base", "derain", "base-2", "derain-2", "my_merge"]
    assert [c.kind for c in columns] == ["base", "adapter", "adapter", "adapter", "merge"]
    assert tasks == ["derain", "base", "denoise", "lowlight"]
    assert columns[-1].tasks == ["derain", "denoise", "lowlight"]
    assert columns[0].tasks == tasks
    assert columns[1].content_hash == columns[3].content_hash  # same weights, same cache identity
    assert safe_name("../a b/c") == "_a_b_c"
    with pytest.raises(AdapterkitError, match="lists no source tasks"):
        _merge_tasks(_adapter("m", merge={"method": "linear", "sources": []}))
    with pytest.raises(AdapterkitError, match="at least one adapter"):
        build_columns([])


def test_merge_view_retention_formula():
    rows = [{"metrics": {"base": {"psnr": 10.0}, "a": {"psnr": 14.0}, "m": {"psnr": 13.0}}, "vs_task_adapter": {"m": 30.0}},
            {"metrics": {"base": {"psnr": 12.0}, "a": {"psnr": 16.0}, "m": {"psnr": 14.0}}, "vs_task_adapter": {"m": 32.0}}]
    summary = summarise_task(rows, ["base", "a", "m"])
    view = merge_view(rows, summary, "m", "a")
    assert view["psnr_retention"] == pytest.approx((13.5 - 11.0) / (15.0 - 11.0))
    assert view["psnr_vs_task_adapter"]["mean"] == pytest.approx(31.0)
    assert merge_view(rows, summary, "m", None)["psnr_retention"] is None
    flat = summarise_task([{"metrics": {"base": {"psnr": 10.0}, "a": {"psnr": 10.0}, "m": {"psnr": 11.0}}, "vs_task_adapter": {"m": 40.0}}], ["base", "a", "m"])
    assert merge_view(rows[:1], flat, "m", "a")["psnr_retention"] is None  # adapter = base: undefined, not infinite


def test_retention_is_not_applicable_when_the_adapter_gain_is_within_noise_issue_18():
    """-0.09 dB of adapter gain printed retention 460%: a ratio over a gain within the rows' noise is n/a, with why."""
    from adapterkit.eval.report import _merge_line

    def rows(adapter_gains):
        return [{"metrics": {"base": {"psnr": 10.0}, "a": {"psnr": 10.0 + g}, "m": {"psnr": 10.5}}, "vs_task_adapter": {"m": 30.0}}
                for g in adapter_gains]

    noisy = rows([1.0, -1.2, 0.5, -0.6])  # mean -0.075 dB, interval across zero
    view = merge_view(noisy, summarise_task(noisy, ["base", "a", "m"]), "m", "a")
    assert view["psnr_retention"] is None and "not above the rows' noise" in view["note"]
    assert view["adapter_gain"]["n"] == 4 and view["adapter_gain"]["ci95"][0] < 0 < view["adapter_gain"]["ci95"][1]
    assert "PSNR retention n/a (the task adapter's gain over the base (-0.07 dB" in _merge_line("m", view)
    worse = rows([-2.0, -2.1, -1.9])  # clearly harmful: no retention either
    assert merge_view(worse, summarise_task(worse, ["base", "a", "m"]), "m", "a")["psnr_retention"] is None
    clear = rows([2.0, 2.2, 1.8])  # above the noise: 0.5 / 2.0
    view = merge_view(clear, summarise_task(clear, ["base", "a", "m"]), "m", "a")
    assert view["note"] is None and view["psnr_retention"] == pytest.approx(0.25)
    one = rows([2.0])
    assert "no noise estimate" in merge_view(one, summarise_task(one, ["base", "a", "m"]), "m", "a")["note"]


def test_merge_table_shows_the_why_column_only_when_a_retention_is_missing():
    from adapterkit.eval.report import _merge_table

    view = {"task_adapter": "derain", "psnr_retention": 0.86, "merged_gain_db": 3.6, "adapter_gain_db": 4.2,
            "psnr_vs_task_adapter": {"mean": 32.0, "ci95": [30.0, 34.0], "n": 8}}
    both = {"merges": {"merged-lsq": view, "merged-linear": dict(view, psnr_retention=0.56)}}
    assert "n/a because" not in _merge_table(both) and "86%" in _merge_table(both)
    missing = {"merges": {"merged-lsq": view, "merged-linear": dict(view, psnr_retention=None, note="gain within noise")}}
    table = _merge_table(missing)
    assert "<th>retention n/a because</th>" in table and "gain within noise" in table and table.count("<td class=\"note\">") == 2
