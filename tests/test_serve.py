"""`adapterkit serve` against a real uvicorn process (the `served` fixture in conftest.py): concurrent clients over
three adapters, the base and routing, every answer equal to `adapterkit edit`; each bad input and overload answered
with its status and a one-line JSON error, the server serving afterwards (issue 14)."""

from __future__ import annotations

import io
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from adapterkit.cli import main
from adapterkit.testing import random_image

requests = pytest.importorskip("requests")


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def post_edit(served, image: bytes, client_timeout: float = 120, **fields):
    return requests.post(served["url"] + "/v1/edit", files={"image": ("in.png", image, "image/png")},
                         data={k: str(v) for k, v in fields.items()}, timeout=client_timeout)


def metric(served, name: str, **labels) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    text = requests.get(served["url"] + "/metrics", timeout=10).text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + wanted + '}') if wanted else ''} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def cli_edit(served, tmp_path, image_path, adapter: str, instruction: str, **options) -> np.ndarray:
    """`adapterkit edit` with the same arguments: one --adapter applies it, all of them route ("auto"), none is the base."""
    folders = served["folders"]
    chosen = {"base": [], "auto": list(folders.values())}.get(adapter, [folders.get(adapter)])
    out = tmp_path / f"cli-{adapter}-{'-'.join(f'{k}{v}' for k, v in options.items())}.png"
    args = ["edit", "--base", served["base"], *sum((["--adapter", f] for f in chosen), []), str(image_path),
            "--instruction", instruction, "--output", str(out), "--quiet"]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)


CASES = [  # (adapter, instruction, image, options): three adapters, the base, and routing to an adapter / to the base
    ("derain", "derain the image", "square", {"seed": 0}),
    ("derain", "derain the image", "square", {"seed": 1}),
    ("cartoonize", "cartoonize the image", "square", {"seed": 0}),
    ("denoise", "denoise the image", "square", {"seed": 2}),
    ("base", "derain the image", "square", {"seed": 0}),
    ("auto", "cartoonize the image", "square", {"seed": 3}),
    ("auto", "a completely different request", "square", {"seed": 0}),
    ("denoise", "denoise the image", "wide", {"seed": 0, "resolution": 56}),
    ("cartoonize", "cartoonize the image", "wide", {"seed": 4, "resolution": 56}),
    ("base", "x", "wide", {"seed": 0, "resolution": 56}),
]


def test_concurrent_clients_get_what_adapterkit_edit_writes(served, tmp_path):
    images = {"square": random_image(0), "wide": random_image(1, size=80).crop((0, 0, 80, 64))}
    paths = {}
    for name, image in images.items():
        paths[name] = tmp_path / f"{name}.png"
        image.save(paths[name])

    def ask(case):
        adapter, instruction, image, options = case
        return post_edit(served, paths[image].read_bytes(), instruction=instruction, adapter=adapter, steps=2, **options)

    with ThreadPoolExecutor(6) as pool:  # 6 in flight: the queue (6) never overflows
        answers = list(pool.map(ask, CASES))
    batch_sizes = []
    for (adapter, instruction, image, options), answer in zip(CASES, answers):
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "image/png"
        served_pixels = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"), dtype=np.int16)
        expected = cli_edit(served, tmp_path, paths[image], adapter, instruction, steps=2, **options)
        assert served_pixels.shape == expected.shape
        assert np.abs(served_pixels - expected).max() <= 1, (adapter, options)  # <= 1/255 per pixel
        batch_sizes.append(int(answer.headers["x-adapterkit-batch-size"]))
    routed = {c[1]: a.headers["x-adapterkit-adapter"] for c, a in zip(CASES, answers) if c[0] == "auto"}
    assert routed == {"cartoonize the image": "cartoonize", "a completely different request": "base"}
    assert max(batch_sizes) >= 2  # requests arriving while a batch runs were batched together


def test_an_image_of_any_size_comes_back_at_its_size_as_adapterkit_edit_writes_it(served, tmp_path):
    """67 x 65 pixels: the pipeline edits at sides rounded down to its VAE's multiple; the server answers at the size
    sent, the same picture `adapterkit edit` writes (it used to refuse sides that were not multiples of 8)."""
    path = tmp_path / "odd.png"
    random_image(2, size=80).crop((0, 0, 67, 65)).save(path)
    answer = post_edit(served, path.read_bytes(), instruction="derain the image", adapter="derain", steps=2)
    assert answer.status_code == 200, answer.text
    served_pixels = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"), dtype=np.int16)
    assert served_pixels.shape == (65, 67, 3)
    expected = cli_edit(served, tmp_path, path, "derain", "derain the image", steps=2)
    assert np.abs(served_pixels - expected).max() <= 1


def test_a_large_photo_is_edited_scaled_down_and_answered_at_its_size_as_adapterkit_edit_writes_it(served, tmp_path):
    """Without a resolution, a shorter side over 4x the base's training size is edited at that side (a phone photo at
    its own size held the one worker for hours on a CPU, past every timeout) and answered at the size sent: the
    picture `adapterkit edit` writes."""
    from adapterkit.base import read_base_info

    largest = 4 * read_base_info(served["base"])["resolution"]
    path = tmp_path / "large.png"
    random_image(5, 40).resize((largest + 48, largest + 8), Image.Resampling.NEAREST).save(path)
    answer = post_edit(served, path.read_bytes(), instruction="derain the image", adapter="derain", steps=1)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-adapterkit-edited-size"] == f"{(largest + 48) * largest // (largest + 8) // 8 * 8}x{largest}"
    served_pixels = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"), dtype=np.int16)
    assert served_pixels.shape == (largest + 8, largest + 48, 3)
    expected = cli_edit(served, tmp_path, path, "derain", "derain the image", steps=1)
    # 1/255 at the edited size, as the other answers; bicubic upscaling's negative lobes can carry that to 2/255
    assert np.abs(served_pixels - expected).max() <= 2 and np.abs(served_pixels - expected).mean() < 0.05


def test_a_heic_photo_is_edited_like_any_other(served, tmp_path):
    """An iPhone's HEIC upload was 400 "not an image" (session 23); with pillow-heif (the [heic] extra) it is edited
    and answered as PNG at its size."""
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    random_image(6, size=48).save(tmp_path / "photo.heic")
    answer = post_edit(served, (tmp_path / "photo.heic").read_bytes(), instruction="x", adapter="base", steps=1)
    assert answer.status_code == 200, answer.text
    assert Image.open(io.BytesIO(answer.content)).size == (48, 48)


def _one_line_error(answer, status: int) -> str:
    assert answer.status_code == status, (answer.status_code, answer.text)
    message = answer.json()["error"]
    assert message and "\n" not in message
    return message


def _bomb() -> bytes:
    """A PNG header claiming 100,000 x 100,000 pixels (the pixels are never written)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def test_bad_inputs_get_their_status_and_the_server_keeps_serving(served):
    good = png_bytes(random_image(0))
    noise = Image.fromarray(np.random.RandomState(0).randint(0, 256, (300, 300, 3), dtype=np.uint8))
    assert "limit" in _one_line_error(post_edit(served, png_bytes(noise), instruction="x"), 413)  # 270 KB > 0.25 MB
    assert "decompression bomb" in _one_line_error(post_edit(served, _bomb(), instruction="x"), 400)
    assert "not an image" in _one_line_error(post_edit(served, b"this is not a png", instruction="x"), 400)
    assert "at least 8 x 8" in _one_line_error(post_edit(served, png_bytes(random_image(0, size=5)), instruction="x"), 400)
    message = _one_line_error(post_edit(served, good, instruction="x", adapter="sharpen"), 404)
    assert all(name in message for name in ("sharpen", "derain", "cartoonize", "denoise", "base", "auto"))
    assert "steps" in _one_line_error(post_edit(served, good, instruction="x", steps=1000), 400)
    assert "steps" in _one_line_error(post_edit(served, good, instruction="x", steps="two"), 400)
    assert "instruction" in _one_line_error(post_edit(served, good), 400)
    assert "unknown field" in _one_line_error(post_edit(served, good, instruction="x", weights="w.bin"), 400)
    as_json = requests.post(served["url"] + "/v1/edit", json={"image": "***", "instruction": "x"}, timeout=30)
    assert "base64" in _one_line_error(as_json, 400)
    assert "multipart" in _one_line_error(requests.post(served["url"] + "/v1/edit", data=b"x", headers={"content-type": "text/plain"}), 415)
    ok = requests.post(served["url"] + "/v1/edit", json={"image": __import__("base64").b64encode(good).decode(),
                       "instruction": "derain the image", "steps": 1}, headers={"accept": "application/json"}, timeout=120)
    assert ok.status_code == 200 and ok.json()["adapter"] == "derain" and ok.json()["routed"] is True
    assert requests.get(served["url"] + "/healthz", timeout=10).json()["status"] == "ok"


def test_a_full_queue_answers_503_with_retry_after(served):
    image = png_bytes(random_image(0))
    slow = threading.Thread(target=post_edit, args=(served, image), kwargs={"instruction": "x", "steps": 30, "seed": 9})
    slow.start()
    time.sleep(0.5)  # the slow edit is running: the next ones wait in the queue (6 places)
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda seed: post_edit(served, image, instruction="x", steps=1, seed=seed), range(12)))
    slow.join()
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1 and set(statuses) <= {200, 503}, statuses
    refused = next(a for a in answers if a.status_code == 503)
    assert int(refused.headers["retry-after"]) >= 1 and "busy" in refused.json()["error"]
    assert post_edit(served, image, instruction="x", steps=1).status_code == 200


def _send_and_hang_up(served, image: bytes, **fields) -> None:
    """Send a whole edit request on a raw socket, then close it without reading the answer."""
    prepared = requests.Request("POST", served["url"] + "/v1/edit", files={"image": ("in.png", image, "image/png")},
                                data={k: str(v) for k, v in fields.items()}).prepare()
    host, port = served["url"].removeprefix("http://").split(":")
    head = f"POST /v1/edit HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in prepared.headers.items())
    with socket.create_connection((host, int(port))) as s:
        s.sendall(head.encode() + b"\r\n" + prepared.body)
        time.sleep(0.3)


def test_a_disconnected_client_and_a_timed_out_request_have_their_work_dropped(served):
    image = png_bytes(random_image(0))
    before = {r: metric(served, "adapterkit_dropped_total", reason=r) for r in ("disconnected", "timeout")}
    edited_before = sum(metric(served, "adapterkit_images_total", adapter=a) for a in ("base", "derain", "cartoonize", "denoise"))
    slow = ThreadPoolExecutor(1).submit(post_edit, served, image, instruction="x", steps=30, seed=7)
    time.sleep(0.5)  # the slow edit runs; the next two wait behind it
    _send_and_hang_up(served, image, instruction="x", steps=2, seed=5)
    late = post_edit(served, image, instruction="x", steps=2, seed=6, timeout=0.4)  # the request's own timeout
    assert "did not finish within 0.4 s" in _one_line_error(late, 504)
    assert slow.result().status_code == 200
    assert post_edit(served, image, instruction="x", steps=1).status_code == 200  # still serving
    assert metric(served, "adapterkit_dropped_total", reason="disconnected") == before["disconnected"] + 1
    assert metric(served, "adapterkit_dropped_total", reason="timeout") == before["timeout"] + 1
    edited = sum(metric(served, "adapterkit_images_total", adapter=a) for a in ("base", "derain", "cartoonize", "denoise"))
    assert edited == edited_before + 2  # the slow one and the last one: no work for the two dropped


def test_a_running_batch_whose_every_request_was_abandoned_stops_and_frees_the_worker(served):
    """A request that times out while its batch runs: the batch (that request alone) stops at the next denoising step
    instead of running all 100 of them for nobody; counted as stopped, not as an edited image; the server serves on."""
    image = png_bytes(random_image(3, size=40).resize((256, 256), Image.Resampling.NEAREST))
    before = metric(served, "adapterkit_stopped_total", reason="timeout")
    edited_before = sum(metric(served, "adapterkit_images_total", adapter=a) for a in ("base", "derain", "cartoonize", "denoise"))
    late = post_edit(served, image, instruction="x", adapter="base", steps=100, timeout=1)  # 100 steps: far over 1 s
    assert "did not finish within 1 s" in _one_line_error(late, 504)
    answer = post_edit(served, png_bytes(random_image(0)), instruction="x", steps=1)  # waits for the worker
    assert answer.status_code == 200
    assert metric(served, "adapterkit_stopped_total", reason="timeout") == before + 1
    edited = sum(metric(served, "adapterkit_images_total", adapter=a) for a in ("base", "derain", "cartoonize", "denoise"))
    assert edited == edited_before + 1  # only the second request was edited


def test_adapters_are_added_and_removed_at_run_time_only_from_the_adapter_dir(served, tmp_path):
    from adapterkit.adapters import save_adapter
    from adapterkit.base import load_base
    from adapterkit.testing import random_lora

    url, image = served["url"], tmp_path / "in.png"
    random_image(0).save(image)
    listed = requests.get(url + "/v1/adapters", timeout=10).json()
    assert {a["name"] for a in listed["adapters"]} == {"derain", "cartoonize", "denoise"}
    folder = f"{served['adapter_dir']}/lowlight"
    save_adapter(random_lora(load_base(served["base"]), "lowlight", rank=2, seed=4), folder)  # written server-side
    assert requests.post(url + "/v1/adapters/lowlight", timeout=60).json() == {"added": "lowlight"}
    assert _one_line_error(requests.post(url + "/v1/adapters/lowlight", timeout=60), 409)
    assert "there:" in _one_line_error(requests.post(url + "/v1/adapters/nothere", timeout=60), 404)
    assert _one_line_error(requests.post(url + "/v1/adapters/.hidden", timeout=60), 400)
    answer = post_edit(served, image.read_bytes(), instruction="lowlight the image", adapter="lowlight", steps=2)
    served["folders"]["lowlight"] = folder
    try:
        expected = cli_edit(served, tmp_path, image, "lowlight", "lowlight the image", steps=2)
    finally:
        del served["folders"]["lowlight"]
    assert np.abs(np.asarray(Image.open(io.BytesIO(answer.content)), dtype=np.int16) - expected).max() <= 1
    assert requests.delete(url + "/v1/adapters/lowlight", timeout=60).json() == {"removed": "lowlight"}
    assert "lowlight" in _one_line_error(post_edit(served, image.read_bytes(), instruction="x", adapter="lowlight"), 404)
    assert metric(served, "adapterkit_adapters") == 3
    route = requests.post(url + "/v1/route", json={"instruction": "derain the image"}, timeout=30).json()
    assert route["adapter"] == "derain" and route["score"] == 1.0


def test_serve_refuses_a_busy_port_before_loading_the_base():
    """A port in use is a one-line error, exit 2, before the base loads (a missing base would be another error)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--base", "/no/such/base", "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output, result.output
