"""Load test of the Gradio app on this machine: concurrent clients through gradio_client.

    python benchmarks/app_load.py [--model outputs/sample/resnet50] [--clients 8] [--requests 25]

Starts `python app.py` as its own process on 127.0.0.1, then runs CLIENTS threads that each send
REQUESTS predictions (upload + confidences + Grad-CAM overlay) of a real-size frame. Reports errors,
p50 / p95 / max latency, throughput, and the server's resident memory before and after.
Only loopback traffic; every loop is bounded.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "outputs" / "sample" / "resnet50"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--image", default=None, help="image to send (default: a 560x360 synthetic frame)")
    args = parser.parse_args(argv)

    from gradio_client import Client, handle_file

    from thyroid_classifier.sample import make_sample_dataset

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
