"""Load test of the Gradio app on this machine: concurrent clients through gradio_client.

    python benchmarks/app_load.py [--model FOLDER] [--clients 8] [--requests 25] [--hostile] [--stages]

Starts `python app.py` as its own process on 127.0.0.1, then runs CLIENTS threads that each send
REQUESTS predictions (upload + confidences + Grad-CAM overlay) of a real-size frame. Reports errors,
p50 / p95 / max latency, throughput, and the server's resident memory before and after.
`--hostile` also sends a small PNG declaring 9500 x 10000 pixels and a legal 6000 x 4000 frame, and
reports the server's peak resident memory (sampled every 10 ms) and the time each held the server.
`--stages` times where one request's time goes, in this process: decode, crop and views, predict +
Grad-CAM, the display overlay, PNG encoding. Without `--model`, a randomly initialised 224-px
ResNet50 folder is made (speed does not depend on the weights' values).
Only loopback traffic; every loop is bounded. Run it on another checkout with PYTHONPATH=OTHER/src
to compare before and after.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def random_model_folder(folder: Path) -> Path:
    """A 224-px ResNet50 with random weights, saved as train.py saves a model (no download)."""
    from thyroid_classifier.models import build_model, get_spec
    from thyroid_classifier.preprocess import UltrasoundPreprocessor

    model, processor = build_model(get_spec("resnet50"), ["normal", "benign", "malignant"], "random", 224)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    UltrasoundPreprocessor().save_pretrained(folder)
    return folder


class PeakRss:
    """The peak resident memory of a process while the ``with`` block runs (sampled every 10 ms)."""

    def __init__(self, process) -> None:
        self.process, self.peak, self._stop = process, 0.0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss / 2**20)
            time.sleep(0.01)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def hostile(url: str, model: str, server) -> None:
    from gradio_client import Client, handle_file
    from PIL import Image

    folder = Path(tempfile.mkdtemp())
    bomb = folder / "bomb_9500x10000.png"
    Image.new("L", (9500, 10000), 90).save(bomb, optimize=True)
    big = folder / "legal_6000x4000.png"
    from thyroid_classifier.sample import make_sample_dataset

    frame = make_sample_dataset(folder / "s", cases_per_class=1, frames_per_case=1, size=(360, 560)) / "malignant" / "3000_1.png"
    Image.open(frame).convert("L").resize((6000, 4000)).save(big, optimize=True)  # smooth: a few MB, under the 10 MB limit
    client = Client(url, verbose=False)
    idle = server.memory_info().rss / 2**20
    print(f"server idle (after warm-up): {idle:.0f} MiB")
    for path in (bomb, big):
        start = time.perf_counter()
        with PeakRss(server) as rss:
            try:
                client.predict(handle_file(str(path)), model, 0.45, api_name="/predict")
                outcome = "answered"
            except Exception as exc:  # noqa: BLE001 - a refusal is the expected answer for the bomb
                outcome = f"refused: {str(exc)[:90]}"
        print(f"{path.name} ({path.stat().st_size / 1e6:.1f} MB file): {outcome}; {time.perf_counter() - start:.1f} s; "
              f"peak RSS {rss.peak:.0f} MiB ({rss.peak / idle:.2f}x idle)")


def stages(model: str, image_path: str, repeats: int = 10, encode: str = "JPEG") -> None:
    """Where one request's time goes, stage by stage, in this process (median of ``repeats``)."""
    import io

    from PIL import Image

    from thyroid_classifier.explain import overlay
    from thyroid_classifier.predict import Predictor
    from thyroid_classifier.preprocess import open_image

    predictor = Predictor.from_pretrained(model)
    data = Path(image_path).read_bytes()
    times: dict[str, list[float]] = {k: [] for k in ("decode", "crop + views + pixels", "predict + Grad-CAM", "overlay (display size)", f"{encode} encode x2")}
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        image = open_image(data)
        t1 = time.perf_counter()
        predictor.prepare([image])
        t2 = time.perf_counter()
        [result] = predictor.predict([image], opacity=None)
        t3 = time.perf_counter() - (t2 - t1)  # predict() prepares again: count that once, above
        shown = image.copy()
        shown.thumbnail((1024, 1024))
        heat = Image.fromarray((result.heatmap * 255).astype("uint8")).resize(shown.size)
        blended = overlay(shown, __import__("numpy").asarray(heat) / 255.0, 0.45)
        t4 = time.perf_counter()
        for array in (shown, Image.fromarray(blended)):
            array.save(io.BytesIO(), format=encode)
        t5 = time.perf_counter()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            times[key].append(value)
    med = {k: statistics.median(v[1:]) * 1000 for k, v in times.items()}
    print(f"stages of one request ({Image.open(image_path).size[0]}x{Image.open(image_path).size[1]} frame), median of {repeats}: "
          + ", ".join(f"{k} {v:.0f} ms" for k, v in med.items()) + f"; sum {sum(med.values()):.0f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model folder (default: a random 224-px ResNet50 made in a temporary folder)")
    parser.add_argument("--hostile", action="store_true", help="also send a pixel bomb and a 6000x4000 frame; report peak server memory")
    parser.add_argument("--stages", action="store_true", help="also time each stage of one request in this process")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--image", default=None, help="image to send (default: a 560x360 synthetic frame)")
    args = parser.parse_args(argv)

    from gradio_client import Client, handle_file

    from thyroid_classifier.sample import make_sample_dataset

    if args.model is None:
        args.model = str(random_model_folder(Path(tempfile.mkdtemp()) / "resnet50"))
    image = args.image
    if image is None:
        folder = make_sample_dataset(Path(tempfile.mkdtemp()) / "s", cases_per_class=1, frames_per_case=1, size=(360, 560))
        image = str(folder / "malignant" / "3000_1.png")
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--model", args.model, "--port", str(port), "--examples"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_up(url, proc)
        server = psutil.Process(proc.pid)
        warm = Client(url, verbose=False)
        for _ in range(3):
            warm.predict(handle_file(image), Path(args.model).name, 0.45, api_name="/predict")
        single = []
        for _ in range(20):  # one user alone: what a person waits
            start = time.perf_counter()
            warm.predict(handle_file(image), Path(args.model).name, 0.45, api_name="/predict")
            single.append(time.perf_counter() - start)
        if args.hostile:
            hostile(url, Path(args.model).name, server)
        rss_start = server.memory_info().rss / 2**20
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client_loop() -> None:
            client = Client(url, verbose=False)
            for _ in range(args.requests):
                start = time.perf_counter()
                try:
                    client.predict(handle_file(image), Path(args.model).name, 0.45, api_name="/predict")
                    with lock:
                        latencies.append(time.perf_counter() - start)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")

        started = time.perf_counter()
        threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=1800)
        wall = time.perf_counter() - started
        rss_end = server.memory_info().rss / 2**20
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    total = args.clients * args.requests
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else [float("nan")] * 19
    if args.stages:
        stages(args.model, image)
    print(f"one client alone, 20 requests: latency p50 {statistics.median(single) * 1000:.0f} ms, max {max(single) * 1000:.0f} ms")
    print(f"{args.clients} clients x {args.requests} requests = {total}; model {args.model}; image {image}")
    print(f"errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    print(f"latency p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {q[18] * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
          f"(queued behind other clients: the app runs 1 prediction at a time on CPU)")
    print(f"throughput {len(latencies) / wall:.2f} predictions/s over {wall:.1f} s")
    print(f"server memory: {rss_start:.0f} MiB after warm-up, {rss_end:.0f} MiB after the load ({rss_end - rss_start:+.0f} MiB)")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
