"""Load test of the Gradio app on this machine: what a person waits, alone and among others.

    python benchmarks/app_load.py [--model FOLDER] [--clients 8] [--requests 25] [--hostile] [--stages] [--max_batch N] [--aged N]

Starts `python app.py` as its own process on 127.0.0.1 and talks to it as its web page does
(`PageClient`: the upload when a file is chosen, "Analyse" joins the queue, the answer arrives on
the event stream, the two images shown back are fetched in parallel, on kept-alive connections).
Reports one client alone (upload, then "Analyse" until answer and images are in) beside
`gradio_client`'s time for the same call (that library polls every 50 ms and downloads each file
on its own; its time is not the page's), then CLIENTS threads of REQUESTS predictions each: errors,
p50 / p95 / max latency, throughput, the server's resident memory before and after.
`--hostile` also sends a small PNG declaring 9500 x 10000 pixels and a legal 6000 x 4000 frame, then
moves the opacity control three times at once on that frame's result (the opacity event called
directly, as a hostile client can), and reports the server's peak resident memory (sampled every
10 ms) and how long each held the server.
`--stages` times where one request's time goes, in this process: decode, crop and views, predict +
Grad-CAM, the display overlay, JPEG encoding, and the whole `Predictor.predict` (the goal's
"predict + explain"). Without `--model`, a randomly initialised 224-px ResNet50 folder is made
(speed does not depend on the weights' values).
`--aged N` first runs N cheap events through the server's queue, as a server that has been up a while.
`--burst 8 72` sends, for each number, that many clients at once each analysing a legal 40 Mpx 16-bit RGBA
PNG (0.3 MB; identical uploads, so they share one file as gradio stores them), with an ordinary 560x360
frame sent 1 s into it; reports per burst the server's peak memory and its memory 10 s after (both as
multiples of idle), errors, and the ordinary request's time against its time alone.
Only loopback traffic; every loop is bounded. Run it on another checkout with PYTHONPATH=OTHER/src
(and that checkout's app.py: copy this file there) to compare before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
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


class PageClient:
    """The app's web page, reduced to its HTTP traffic: one session, kept-alive connections."""

    def __init__(self, url: str) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=300)
        self.fetchers = [httpx.Client(timeout=300) for _ in range(2)]  # a browser fetches images in parallel
        self.pool = ThreadPoolExecutor(2)
        self.session = uuid.uuid4().hex[:11]
        config = self.http.get(self.url + "/config").json()
        self.dependencies = config["dependencies"]
        self.api_prefix = config.get("api_prefix", "/gradio_api")

    def close(self) -> None:
        self.pool.shutdown()
        for client in (self.http, *self.fetchers):
            client.close()

    def dependency(self, api_name: str | None = None, trigger: str | None = None) -> tuple[int, dict]:
        for index, dep in enumerate(self.dependencies):
            triggers = [t[1] for t in dep.get("targets", [])]
            if (api_name and dep.get("api_name") == api_name) or (trigger and trigger in triggers):
                return dep.get("id", index), dep
        raise LookupError(f"no event {api_name or trigger} in the app's config")

    def upload(self, path: str | Path) -> dict:
        """What the page does when a file is chosen: the upload, before anyone presses "Analyse"."""
        with open(path, "rb") as f:
            response = self.http.post(f"{self.url}{self.api_prefix}/upload", files=[("files", (Path(path).name, f))])
        response.raise_for_status()
        return {"path": response.json()[0], "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}

    def call(self, fn_index: int, dep: dict, data: list, times: int = 1) -> list[dict]:
        """Run one event ``times`` at once in this session; each completed output, in order of completion."""
        body = {"data": data, "event_data": None, "fn_index": fn_index, "trigger_id": None, "session_hash": self.session}
        if not dep.get("queue", True):  # an event outside the queue (the app before issue 18): direct POSTs
            with ThreadPoolExecutor(times) as pool:
                replies = list(pool.map(lambda _: self.http.post(f"{self.url}{self.api_prefix}/run/predict", json=body), range(times)))
            for reply in replies:
                reply.raise_for_status()
            return [r.json() for r in replies]
        events = set()
        for _ in range(times):
            response = self.http.post(f"{self.url}{self.api_prefix}/queue/join", json=body)
            response.raise_for_status()
            events.add(response.json()["event_id"])
        outputs = []
        with self.http.stream("GET", f"{self.url}{self.api_prefix}/queue/data", params={"session_hash": self.session}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed" and message.get("event_id") in events:
                    if not message.get("success", True):
                        raise RuntimeError((message.get("output") or {}).get("error") or "failed")
                    outputs.append(message["output"])
                    events.discard(message["event_id"])
                    if not events:
                        break
        return outputs

    def fetch(self, urls: list[str]) -> None:
        def get(job):
            client, url = job
            client.get(url).raise_for_status()

        list(self.pool.map(get, zip(self.fetchers, urls)))

    def analyse(self, uploaded: dict, model: str, opacity: float = 0.45) -> dict:
        """"Analyse": the answer and both images of the slider in; the output."""
        fn_index, dep = self.dependency(api_name="predict")
        # image, model, opacity, then (since the source dropdown) where the frame is from and the session's state
        data = [uploaded, model, opacity, "unseen", None][: len(dep["inputs"])]
        [output] = self.call(fn_index, dep, data)
        self.fetch([part["url"] for part in output["data"][1] if part])
        return output

    def reblend(self, opacity: float, times: int = 1) -> list[dict]:
        """The opacity control, called directly (``times`` at once) for this session's result."""
        fn_index, dep = self.dependency(trigger="release")
        return self.call(fn_index, dep, [None, opacity], times=times)


def hostile(url: str, model: str, server) -> None:
    from PIL import Image

    from thyroid_classifier.sample import make_sample_dataset

    folder = Path(tempfile.mkdtemp())
    bomb = folder / "bomb_9500x10000.png"
    Image.new("L", (9500, 10000), 90).save(bomb, optimize=True)
    big = folder / "legal_6000x4000.png"
    frame = make_sample_dataset(folder / "s", cases_per_class=1, frames_per_case=1, size=(360, 560)) / "malignant" / "3000_1.png"
    Image.open(frame).convert("L").resize((6000, 4000)).save(big, optimize=True)  # smooth: a few MB, under the 10 MB limit
    page = PageClient(url)
    idle = server.memory_info().rss / 2**20
    print(f"server idle (after warm-up): {idle:.0f} MiB")

    def report(what: str, call) -> None:
        start = time.perf_counter()
        with PeakRss(server) as rss:
            try:
                call()
                outcome = "answered"
            except Exception as exc:  # noqa: BLE001 - a refusal is the expected answer for the bomb
                outcome = f"refused: {str(exc)[:90]}"
        print(f"{what}: {outcome}; {time.perf_counter() - start:.1f} s; peak RSS {rss.peak:.0f} MiB ({rss.peak / idle:.2f}x idle)")

    for path in (bomb, big):  # the big frame's result stays in the session for the opacity control below
        report(f"{path.name} ({path.stat().st_size / 1e6:.1f} MB file)", lambda path=path: page.analyse(page.upload(path), model))
    report("opacity control x3 at once on the 6000 x 4000 result", lambda: page.reblend(0.8, times=3))
    page.close()


def legal_large_png(folder: Path, size: tuple[int, int] = (8000, 5000)) -> Path:
    """A legal upload that is expensive to decode: 40 Mpx (the limit), 16-bit RGBA, a smooth ramp (0.3 MB)."""
    import cv2
    import numpy as np

    width, height = size
    ramp = np.broadcast_to(np.linspace(0, 65535, height).astype(np.uint16)[:, None], (height, width))
    pixels = np.stack([ramp, ramp, ramp, np.full((height, width), 65535, np.uint16)], axis=-1)
    path = folder / f"legal_{width}x{height}_rgba16.png"
    cv2.imwrite(str(path), pixels, [cv2.IMWRITE_PNG_COMPRESSION, 9])  # PIL cannot write 16-bit RGBA
    return path


def burst(url: str, model: str, server, clients: int, large: Path, ordinary: str, lone_ms: float, idle: float) -> dict:
    """``clients`` pages analyse ``large`` at once (uploaded first, as pages do when a file is chosen);
    1 s in, one more page analyses ``ordinary``. The server's peak and its memory 10 s after, errors,
    the ordinary request's time. ``idle``: the server's memory after its warm-up, before any burst (MiB)."""
    start = server.memory_info().rss / 2**20
    pages = [PageClient(url) for _ in range(clients)]
    uploads = [page.upload(large) for page in pages]
    errors: list[str] = []
    lock = threading.Lock()

    def one(page, uploaded) -> None:
        try:
            page.analyse(uploaded, model)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}"[:160])

    threads = [threading.Thread(target=one, args=pair) for pair in zip(pages, uploads)]
    with PeakRss(server) as rss:
        started = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(1.0)
        extra = PageClient(url)
        t0 = time.perf_counter()
        try:
            extra.analyse(extra.upload(ordinary), model)
            ordinary_ms = (time.perf_counter() - t0) * 1000
        except Exception as exc:  # noqa: BLE001 - counted and reported
            ordinary_ms = float("nan")
            errors.append(f"ordinary: {type(exc).__name__}: {exc}"[:160])
        for t in threads:
            t.join(timeout=1800)
        wall = time.perf_counter() - started
    time.sleep(10)
    after = server.memory_info().rss / 2**20
    for page in (*pages, extra):
        page.close()
    kinds: dict[str, int] = {}
    for error in errors:
        kind = error.split(":", 1)[0] + ": " + ("expired" if "expired" in error else "no such file" if "no such file" in error else
                                            "503 queue full" if "503" in error else error.split(":", 1)[-1][:60])
        kinds[kind] = kinds.get(kind, 0) + 1
    row = {"clients": clients, "idle_mib": idle, "start_mib": start, "errors_by_kind": kinds, "peak_x": rss.peak / idle, "after_10s_x": after / idle, "errors": len(errors),
           "first_error": errors[0] if errors else "", "ordinary_ms": ordinary_ms, "ordinary_x_lone": ordinary_ms / lone_ms, "wall_s": wall}
    print(f"burst of {clients} x {large.name}: idle {idle:.0f} MiB (at its start {start:.0f}), peak {rss.peak:.0f} MiB ({row['peak_x']:.2f}x idle), "
          f"10 s after {after:.0f} MiB ({row['after_10s_x']:.2f}x), errors {len(errors)}" + (f" {kinds}" if errors else "")
          + f"; an ordinary request sent 1 s in: {ordinary_ms:.0f} ms ({row['ordinary_x_lone']:.1f}x its time alone); all done in {wall:.0f} s")
    return row


def age(url: str, events: int, chunk: int = 50) -> None:
    """Make the server one that has run for a while: ``events`` cheap events through its queue (the
    opacity control of a session with no result, answered without work), ``chunk`` at a time (the
    queue holds 64). gradio keeps a record per event; what a request costs must not grow with them."""
    page = PageClient(url)
    start = time.perf_counter()
    for done in range(0, events, chunk):
        page.reblend(0.5, times=min(chunk, events - done))
    page.close()
    print(f"aged the server by {events} events in {time.perf_counter() - start:.0f} s")


def standalone_predict(predictor, image_path: str):
    """A function that runs the whole ``predictor.predict`` on the image in this process and returns its ms."""
    from thyroid_classifier.preprocess import open_image

    data = Path(image_path).read_bytes()

    def run() -> float:
        image = open_image(data)
        start = time.perf_counter()
        predictor.predict([image], opacity=None)
        return (time.perf_counter() - start) * 1000

    for _ in range(3):
        run()
    return run


def stages(predictor, image_path: str, repeats: int = 10, encode: str = "JPEG") -> dict[str, float]:
    """Where one request's time goes, stage by stage, in this process (median of ``repeats``, ms)."""
    import io

    from PIL import Image

    from thyroid_classifier.app import blended, display_state
    from thyroid_classifier.preprocess import open_image

    data = Path(image_path).read_bytes()
    names = ("decode", "crop + views + pixels", "predict + Grad-CAM", "overlay (display size)", f"{encode} encode x2")
    times: dict[str, list[float]] = {k: [] for k in (*names, "Predictor.predict")}
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        image = open_image(data)
        t1 = time.perf_counter()
        predictor.prepare([image])
        t2 = time.perf_counter()
        [result] = predictor.predict([image], opacity=None)
        t3 = time.perf_counter()
        whole = t3 - t2
        halves = blended(display_state(image, result.heatmap), 0.45)  # as the app draws them
        t4 = time.perf_counter()
        for array in halves:
            Image.fromarray(array).save(io.BytesIO(), format=encode)
        t5 = time.perf_counter()
        # predict() prepares again: its crop, views and pixels are counted once, above
        for key, value in zip(times, (t1 - t0, t2 - t1, whole - (t2 - t1), t4 - t3, t5 - t4, whole)):
            times[key].append(value)
    med = {k: statistics.median(v[1:]) * 1000 for k, v in times.items()}
    print(f"stages of one request ({Image.open(image_path).size[0]}x{Image.open(image_path).size[1]} frame), median of {repeats}: "
          + ", ".join(f"{k} {med[k]:.0f} ms" for k in names) + f"; sum {sum(med[k] for k in names):.0f} ms; "
          f"the whole Predictor.predict (crop, pixels, predict, Grad-CAM, guard, set): {med['Predictor.predict']:.0f} ms")
    return med


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model folder (default: a random 224-px ResNet50 made in a temporary folder)")
    parser.add_argument("--hostile", action="store_true", help="also send a pixel bomb and a 6000x4000 frame and move the opacity control on it; report peak server memory")
    parser.add_argument("--stages", action="store_true", help="also time each stage of one request in this process")
    parser.add_argument("--burst", type=int, nargs="+", default=None, metavar="N",
                        help="for each N: N clients at once analyse a legal 40 Mpx 16-bit RGBA PNG (and one ordinary request 1 s in); "
                             "then exit without the steady load")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--image", default=None, help="image to send (default: a 560x360 synthetic frame)")
    parser.add_argument("--aged", type=int, default=0, metavar="N", help="first run N cheap events through the server's queue (a server that has been up a while: gradio keeps up to 10000 records)")
    parser.add_argument("--max_batch", type=int, default=None, help="the app's --max_batch (default: the app's; 1: every request its own forward pass, as before batching)")
    args = parser.parse_args(argv)

    from gradio_client import Client, handle_file

    from thyroid_classifier.predict import Predictor
    from thyroid_classifier.sample import make_sample_dataset

    if args.model is None:
        args.model = str(random_model_folder(Path(tempfile.mkdtemp()) / "resnet50"))
    image = args.image
    if image is None:
        folder = make_sample_dataset(Path(tempfile.mkdtemp()) / "s", cases_per_class=1, frames_per_case=1, size=(360, 560))
        image = str(folder / "malignant" / "3000_1.png")
    name = Path(args.model).name
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    batch = [] if args.max_batch is None else ["--max_batch", str(args.max_batch)]
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--model", args.model, "--port", str(port), "--examples", *batch],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_up(url, proc)
        server = psutil.Process(proc.pid)
        if args.aged:
            age(url, args.aged)
        page = PageClient(url)
        for _ in range(3):  # warm-up
            page.analyse(page.upload(image), name)
        alone: dict[str, list[float]] = {"upload": [], "analyse": [], "both": []}
        # --stages: one Predictor in this process, for the pairing below and the stage timing after the load
        local = Predictor.from_pretrained(args.model) if args.stages else None
        model_alone = standalone_predict(local, image) if local is not None else None
        around: list[float] = []
        for _ in range(20):  # one user alone: what a person waits
            t0 = time.perf_counter()
            uploaded = page.upload(image)
            t1 = time.perf_counter()
            page.analyse(uploaded, name)
            t2 = time.perf_counter()
            for key, value in zip(alone, (t1 - t0, t2 - t1, t2 - t0)):
                alone[key].append(value * 1000)
            if model_alone is not None:  # the same work in this process right after, while the server idles
                around.append((t2 - t0) * 1000 - model_alone())
        page.close()
        library = Client(url, verbose=False)
        library_times = []
        for _ in range(10):
            start = time.perf_counter()
            library.predict(handle_file(image), name, 0.45, api_name="/predict")
            library_times.append((time.perf_counter() - start) * 1000)
        if args.hostile:
            hostile(url, name, server)
        if args.burst:
            large = legal_large_png(Path(tempfile.mkdtemp()))
            lone, idle = statistics.median(alone["both"]), server.memory_info().rss / 2**20
            rows = [burst(url, name, server, n, large, image, lone, idle) for n in args.burst]
            print(json.dumps(rows))
            return 1 if any(r["errors"] for r in rows) else 0
        rss_start = server.memory_info().rss / 2**20
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client_loop() -> None:
            client = PageClient(url)
            for _ in range(args.requests):
                start = time.perf_counter()
                try:
                    client.analyse(client.upload(image), name)
                    with lock:
                        latencies.append((time.perf_counter() - start) * 1000)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
            client.close()

        started, client_cpu = time.perf_counter(), time.process_time()
        threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        with PeakRss(server) as load_peak:
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=1800)
        wall = time.perf_counter() - started
        client_cpu = time.process_time() - client_cpu  # this process's CPU: it shares the 2 cores with the server
        rss_end = server.memory_info().rss / 2**20
        time.sleep(3)  # the server idles: what it keeps once the burst is over
        rss_idle = server.memory_info().rss / 2**20
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    total = args.clients * args.requests
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) >= 2 else [float("nan")] * 19
    single = {k: statistics.median(v) for k, v in alone.items()}
    print(f"one client alone, 20 requests as the page sends them (p50): upload {single['upload']:.0f} ms, "
          f"'Analyse' until the answer and both images are in {single['analyse']:.0f} ms, together {single['both']:.0f} ms "
          f"(max {max(alone['both']):.0f} ms); the same call through gradio_client: p50 {statistics.median(library_times):.0f} ms")
    if args.stages:
        med = stages(local, image)
        # The stage timing runs after the load, in this process: a different moment from the lone requests above (the machine's
        # speed drifts, and the server's model thread is another process), so the two are never subtracted; only the paired one is.
        print(f"around the model: paired with a Predictor.predict run here right after each lone request, a request takes "
              f"+ {statistics.median(around):.0f} ms beyond the model (median of 20; goal: + 50 ms at most); for scale, one request "
              f"(upload + Analyse) {single['both']:.0f} ms and, timed later in this process, Predictor.predict {med['Predictor.predict']:.0f} ms")
    print(f"{args.clients} clients x {args.requests} requests = {total} (each: upload + Analyse); model {args.model}; image {image}")
    print(f"errors: {len(errors)}" + (f" {kinds}" if errors else ""))
    print(f"latency p50 {statistics.median(latencies):.0f} ms, p95 {q[18]:.0f} ms, max {max(latencies):.0f} ms "
          f"(queued behind other clients; the app runs one forward pass at a time, for every request that waits); p95 / single p50 = {q[18] / single['both']:.1f} (goal <= 8)")
    print(f"throughput {len(latencies) / wall:.2f} predictions/s over {wall:.1f} s; the {args.clients} clients used {client_cpu / wall:.0%} of one core")
    print(f"server memory: {rss_start:.0f} MiB after warm-up, peak {load_peak.peak:.0f} MiB during the load ({load_peak.peak - rss_start:+.0f}), "
          f"{rss_end:.0f} MiB after it ({rss_end - rss_start:+.0f} MiB), "
          f"{rss_idle:.0f} MiB 3 s later ({rss_idle - rss_start:+.0f} MiB)")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
