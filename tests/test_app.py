"""The Gradio app driven through gradio_client on 127.0.0.1 with tiny models, and every bad input."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thyroid_classifier.app import QUEUE_ANALYTICS, build_demo, load_predictors, metrics_markdown


@pytest.fixture(scope="module")
def server(short_run, sample_dir):
    out, results = short_run
    predictors = load_predictors([str(out / name) for name in results])
    demo = build_demo(predictors, examples=[str(sample_dir / "benign" / "2000_1.png")], forget_uploads_after=2.0)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, max_file_size="2mb", quiet=True)
    yield demo, predictors
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    demo, _ = server
    return Client(f"http://127.0.0.1:{demo.server_port}/", verbose=False)


def ask(client, path: Path, model: str = "tiny-resnet", opacity: float = 0.45):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), model, opacity, api_name="/predict")


def _ultrasound(sample_dir: Path) -> Image.Image:
    return Image.open(sample_dir / "malignant" / "3000_1.png").convert("RGB")


def answered(message: str) -> bool:
    """The message carries one of the answers: a headlined label (with where its promise holds), or why not."""
    return any(words in message for words in ("at 95% confidence", "cannot tell", "Cannot tell", "Not reliable"))


def _check_result(result, size: tuple[int, int]):
    label, slider, message = result[:3]
    data = result[-1]
    scores = data["scores"]
    assert set(scores) == {"normal", "benign", "malignant"}
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-3)
    top = max(scores, key=scores.get)
    assert label["label"] == data["answer"] and data["reason"] in message
    if data["headlined"]:
        # Only a headlined label carries its bars.
        confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
        assert label["label"] == top and confidences == pytest.approx(scores, abs=1e-6) and "not an answer" not in message
    else:
        # Any other answer shows no bars; its scores are in the text, said not to be an answer.
        assert not label.get("confidences") and "The model's scores, not an answer" in message
        if data["flagged"]:
            assert label["label"] == "Not reliable" and "unlike the images the model learned from" in message
        elif label["label"].endswith(": cannot tell"):
            assert len(data["prediction_set"]) > 1 and "cannot rule out" in message
        else:  # no evidence for this regime, or not confident enough for it
            assert label["label"] == "Cannot tell" and ("never measured" in message or "leans to" in message)
    original, heat = (Image.open(item) if isinstance(item, str) else Image.open(item["path"]) for item in slider)
    assert heat.size == size and original.size == size
    return message


def test_api_predict(client, sample_dir, tmp_path):
    path = tmp_path / "frame.png"
    _ultrasound(sample_dir).save(path)
    size = _ultrasound(sample_dir).size
    message = _check_result(ask(client, path), size)
    assert answered(message)
    assert "colour" not in message  # a grey frame gets no warning
    _check_result(ask(client, path, model="tiny-vgg"), size)  # side by side: the second model


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


GOOD_VARIANTS = {
    "grey.png": lambda im, p: (_save(im.convert("L"), p), im.size),
    "rgba.png": lambda im, p: (_save(im.convert("RGBA"), p), im.size),
    "palette.png": lambda im, p: (_save(im.convert("P"), p), im.size),
    "cmyk.jpg": lambda im, p: (_save(im.convert("CMYK"), p), im.size),
    "sixteen_bit.png": lambda im, p: (_save(Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257), p), im.size),
    "animated.gif": lambda im, p: (_save(im.convert("P"), p, save_all=True, append_images=[im.rotate(10).convert("P")], duration=100, loop=0), im.size),
}


@pytest.mark.parametrize("name", sorted(GOOD_VARIANTS))
def test_every_image_mode_is_accepted(client, sample_dir, tmp_path, name):
    path, size = GOOD_VARIANTS[name](_ultrasound(sample_dir), tmp_path / name)
    _check_result(ask(client, path), size)


def test_exif_rotated_upload_is_shown_upright(client, sample_dir, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated by 90 degrees
    image = _ultrasound(sample_dir)
    path = _save(image, tmp_path / "rotated.jpg", exif=exif)
    _check_result(ask(client, path), (image.height, image.width))


def test_colour_photo_gets_a_warning(client, tmp_path):
    rng = np.random.default_rng(0)
    photo = np.zeros((200, 300, 3), np.uint8)
    photo[..., 0] = rng.integers(150, 255, (200, 300))
    photo[..., 1] = rng.integers(0, 90, (200, 300))
    message = _check_result(ask(client, _save(Image.fromarray(photo), tmp_path / "photo.jpg")), (300, 200))
    assert "not be a grey-scale ultrasound" in message


def _truncated_jpeg(sample_dir: Path, path: Path) -> Path:
    buffer = io.BytesIO()
    _ultrasound(sample_dir).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    return path


def _bomb(path: Path) -> Path:
    Image.new("1", (30_000, 30_000)).save(path)  # 900 megapixels in a few kilobytes
    return path


BAD_INPUTS = {
    "text.png": (lambda d, p: (p.write_text("not an image at all"), p)[1], "not an image"),
    "truncated.jpg": (_truncated_jpeg, "truncated"),
    "empty.png": (lambda d, p: (p.write_bytes(b""), p)[1], "empty file"),
    "bomb.png": (lambda d, p: _bomb(p), "too many pixels"),
    "tiny.png": (lambda d, p: _save(Image.new("L", (10, 10), 90), p), "too small"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_gives_a_clear_error_and_the_server_keeps_serving(client, sample_dir, tmp_path, name):
    from gradio_client.exceptions import AppError

    make, expected = BAD_INPUTS[name]
    path = make(sample_dir, tmp_path / name)
    with pytest.raises(AppError) as error:
        ask(client, path)
    text = str(error.value)
    assert expected in text.lower() and "Traceback" not in text
    good = _save(_ultrasound(sample_dir), tmp_path / "after.png")
    _check_result(ask(client, good), _ultrasound(sample_dir).size)


def test_upload_size_limit(client, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(3 * 1024 * 1024))
    with pytest.raises(Exception, match="(?i)size|large|exceed"):
        ask(client, big)


def test_uploads_are_not_kept(client, server, sample_dir, tmp_path):
    import os
    import tempfile
    import time

    path = _save(_ultrasound(sample_dir), tmp_path / "private_frame_4242.png")
    ask(client, path)
    cache = Path(os.environ.get("GRADIO_TEMP_DIR", Path(tempfile.gettempdir()) / "gradio"))
    assert list(cache.rglob("private_frame_4242.png"))  # the upload arrived in the server's cache ...
    time.sleep(3.0)
    assert not list(cache.rglob("private_frame_4242.png"))  # ... and is gone once it has been read


def test_identical_uploads_at_the_same_time_all_succeed(server, sample_dir, tmp_path):
    """Gradio stores uploads by content: concurrent identical uploads share one file."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    demo, _ = server
    path = _save(_ultrasound(sample_dir), tmp_path / "same.png")
    # download_files=False: identical requests also write identical *output* files to one cached
    # path, and gradio may rewrite it while another client downloads it; that race is gradio's.
    clients = [Client(f"http://127.0.0.1:{demo.server_port}/", verbose=False, download_files=False) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: ask(c, path), clients))
    for label, slider, message, data in (r[:3] + r[-1:] for r in results):
        assert answered(message) and len(slider) == 2 and label["label"] == data["answer"]
        assert sum(data["scores"].values()) == pytest.approx(1.0, abs=1e-3)


def test_metrics_markdown_shows_card_numbers(server):
    _, predictors = server
    text = metrics_markdown(predictors["tiny-resnet"].info)
    assert "macro ROC AUC" in text and "95%" in text
    # Where each number holds: in-source, and no unseen source measured for this model.
    assert "In-source evaluation" in text and "Not measured on any unseen source" in text
    assert metrics_markdown({}) == "_No evaluation found for this model._"


def test_module_level_demo_and_environment_defaults(short_run, monkeypatch, tmp_path):
    """`gradio app.py` and a Space import app.py and serve its `demo`, built from $MODEL_ID; the
    host and port a Space sets are honoured, and locally the app still binds loopback."""
    import importlib.util

    import gradio as gr

    from thyroid_classifier.app import parse_args

    out, _ = short_run
    for name in ("MODEL_ID", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    local = parse_args([])
    assert local.host == "127.0.0.1" and local.port is None and local.model == ["outputs/sample/resnet50"]
    monkeypatch.setenv("MODEL_ID", str(out / "tiny-resnet"))
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    space = parse_args([])
    assert space.host == "0.0.0.0" and space.port == 7999 and space.model == [str(out / "tiny-resnet")]
    assert parse_args(["--host", "127.0.0.1"]).host == "127.0.0.1"  # a flag still wins
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "files"))  # else the module's demo makes this process's files private to it
    spec = importlib.util.spec_from_file_location("app_module_under_test", Path(__file__).resolve().parents[1] / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert isinstance(module.demo, gr.Blocks)
    assert any(fn.name == "predict" for fn in module.demo.fns.values())


@pytest.mark.parametrize("flag", ["--concurrency", "--max_batch"])
def test_zero_model_threads_or_batch_size_is_refused_by_the_command_line(flag, capsys):
    """Before a model loads, with argparse's one-line error (not a ValueError's stack trace)."""
    from thyroid_classifier.app import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args([flag, "0"])
    assert exit_info.value.code == 2 and "must be at least 1, not 0" in capsys.readouterr().err
    assert getattr(parse_args([flag, "3"]), flag.lstrip("-")) == 3


def test_an_example_is_not_deleted_after_someone_uses_it(server):
    """Clicking an example sends gradio's cached copy of it, which serves every visitor: the upload
    clock must not delete it (the fixture's clock is 2 s)."""
    import time

    demo, _ = server
    kept = set().union(*(getattr(block, "keep_in_cache", set()) for block in demo.blocks.values()))
    example = next(p for p in kept if p.endswith(".png"))
    predict = next(fn for fn in demo.fns.values() if fn.name == "predict").fn
    value, images, message, state, _ = predict(example, "tiny-resnet", 0.45)
    assert answered(message)
    time.sleep(3.0)
    assert Path(example).is_file()


def test_models_are_loaded_and_run_on_one_thread_of_their_own_and_waiting_requests_share_a_pass(short_run, sample_dir, monkeypatch, tmp_path):
    """torch's CPU thread pool belongs to the thread that calls it: each of gradio's worker threads
    that ran a model started another pool, and on a 2-core CPU every later prediction ran up to
    1.8x slower. The app loads and runs its models on one fixed thread, never on gradio's workers
    (which vary from request to request) nor on the thread that started the app. Requests that
    arrive while the model is busy go through it together, and each gets the answer it gets alone."""
    import threading
    import time

    from gradio_client import Client, handle_file

    from thyroid_classifier import app
    from thyroid_classifier.predict import Predictor

    out, _ = short_run
    threads = {"load": set(), "predict": set()}
    batches: list[int] = []
    load, predict = Predictor.from_pretrained.__func__, Predictor.predict

    def spy_load(cls, *args, **kwargs):
        threads["load"].add(threading.get_ident())
        return load(cls, *args, **kwargs)

    def spy_predict(self, images, *args, **kwargs):
        threads["predict"].add(threading.get_ident())
        batches.append(len(images))
        if len(batches) == 1:
            time.sleep(1.5)  # a slow first pass: the other requests arrive and wait meanwhile
        return predict(self, images, *args, **kwargs)

    monkeypatch.setattr(Predictor, "from_pretrained", classmethod(spy_load))
    monkeypatch.setattr(Predictor, "predict", spy_predict)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "files"))  # the command line's private folder, without changing this process's
    demo = app.demo_from_arguments(app.parse_args(["--model", str(out / "tiny-resnet"), "--examples"]))
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    frames = [sample_dir / name for name in ("malignant/3000_1.png", "benign/2000_1.png", "normal/1000_1.png", "benign/2001_1.png")] * 2

    def confidences(result) -> list[float]:
        return [v for _, v in sorted(result[-1]["scores"].items())]

    try:
        client = Client(f"http://127.0.0.1:{demo.server_port}/", verbose=False)
        jobs = [client.submit(handle_file(str(frame)), "tiny-resnet", 0.45, api_name="/predict") for frame in frames]
        together = [job.result(timeout=120) for job in jobs]
        passes = len(batches)
        alone = [client.predict(handle_file(str(frame)), "tiny-resnet", 0.45, api_name="/predict") for frame in frames[:4]]
    finally:
        demo.close()
    assert all(answered(result[2]) for result in together)
    assert max(batches[:passes]) > 1 and sum(batches[:passes]) == len(frames)  # some requests shared a pass
    assert batches[passes:] == [1, 1, 1, 1]  # one request at a time: none waits for company
    for got, expected in zip(together, alone * 2, strict=True):  # each its own answer
        assert confidences(got) == pytest.approx(confidences(expected), abs=1e-4)
    assert len({round(confidences(r)[0], 3) for r in alone}) > 1  # (the frames' answers differ: a mix-up would show)
    assert len(threads["predict"]) == 1 and threads["predict"] == threads["load"]
    assert threading.get_ident() not in threads["load"]


@pytest.mark.parametrize("environment", [{}, {"GRADIO_ANALYTICS_CACHE_FREQUENCY": "1"}], ids=["app default", "set by the environment"])
def test_the_queue_does_not_summarise_every_past_event_after_each_request(server, sample_dir, monkeypatch, environment):
    """gradio's queue keeps its last 10000 events and, after every event, summarises them all with
    pandas for its /monitoring dashboard (off in this app): 12 ms of CPU a request on a server that
    has run 10000. The app turns that off unless the environment asks for it, and leaves the
    environment as it found it."""
    from gradio.queueing import Queue
    from gradio_client import Client, handle_file

    _, predictors = server
    summaries: list[int] = []
    summarise = Queue._get_df

    def spy(records):
        summaries.append(len(records))
        return summarise(records)

    monkeypatch.setattr(Queue, "_get_df", staticmethod(spy))
    for name in QUEUE_ANALYTICS:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    demo = build_demo(predictors)
    assert {name: os.environ.get(name) for name in QUEUE_ANALYTICS} == {name: environment.get(name) for name in QUEUE_ANALYTICS}
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{demo.server_port}/", verbose=False, download_files=False)
        for _ in range(3):
            assert answered(client.predict(handle_file(str(sample_dir / "benign" / "2000_1.png")), "tiny-resnet", 0.45, api_name="/predict")[2])
    finally:
        demo.close()
    assert len(summaries) == (3 if environment else 0)  # (the spy sees gradio's summaries when they run: one a request)


def test_the_frames_source_decides_its_regime_through_the_api(client, server, sample_dir, tmp_path):
    """Nothing said: answered as a source the model never saw (this model has no such evidence: no label);
    said to be one of its training sources: the in-source regime, whose sets come from validation; a
    source the model does not know: a message, not a stack trace."""
    from gradio_client import handle_file

    _, predictors = server
    predictor = predictors["tiny-resnet"]
    path = _save(_ultrasound(sample_dir), tmp_path / "frame.png")
    default = ask(client, path)[-1]
    assert default["regime"] == "unseen" and not default["headlined"] and default["answer"] == "Cannot tell"
    assert predictor.training_sources and predictor.training_sources[0] in default["reason"]
    source = predictor.training_sources[0]
    own = client.predict(handle_file(str(path)), "tiny-resnet", 0.45, source, api_name="/predict")[-1]
    [expected] = predictor.predict([_ultrasound(sample_dir)], explain=False, source=source)
    assert own["regime"] == "in_source" and own["prediction_set"] == expected.prediction_set and own["answer"] == expected.headline
    with pytest.raises(Exception, match="not one of this model's training sources|not in the list of choices"):
        client.predict(handle_file(str(path)), "tiny-resnet", 0.45, "elsewhere", api_name="/predict")
    # Past the dropdown (a direct call of the page's function): the page's own message, before any work.
    predict = next(fn for fn in server[0].fns.values() if fn.name == "predict").fn
    with pytest.raises(Exception, match="elsewhere is not one of this model's training sources"):
        predict(str(path), "tiny-resnet", 0.45, "elsewhere")


def test_the_page_says_a_synthetic_model_is_synthetic(server):
    """The quick start's model (trained on the synthetic sample) says so on the page, from its folder."""
    import json as _json

    demo, predictors = server
    assert predictors["tiny-resnet"].info["data"]["dataset"]["type"] == "synthetic-sample"
    page = _json.dumps(demo.config, default=str)
    assert "trained on SYNTHETIC images" in page and "TI-RADS risk categories" not in page


def test_the_server_keeps_its_files_in_a_private_folder_and_serves_nothing_else(short_run, tmp_path):
    """`python app.py` puts every file gradio writes in a folder of its own (this user only, removed at exit);
    a file another gradio process left in the host-wide /tmp/gradio is not served (it was, with status 200)."""
    import re
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    out, _ = short_run
    shared = Path(tempfile.gettempdir()) / "gradio" / f"planted-{os.getpid()}"
    shared.mkdir(parents=True, exist_ok=True)
    planted = shared / "someone_elses_upload.txt"
    planted.write_text("not yours")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    log = (tmp_path / "app.log").open("w+")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parents[1] / "app.py"), "--model", str(out / "tiny-resnet"),
                             "--port", str(port), "--examples"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and "Running on" not in (tmp_path / "app.log").read_text():
            assert proc.poll() is None, (tmp_path / "app.log").read_text()
            time.sleep(0.5)
        text = (tmp_path / "app.log").read_text()
        folder = Path(re.search(r"this server's files: (\S+)", text).group(1))
        assert folder.is_dir() and (folder.stat().st_mode & 0o777) == 0o700 and not str(folder).startswith(str(shared.parent) + "/")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/file={planted}", timeout=30)
        assert refused.value.code == 403
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl+C: the server closes and the process exits normally
        proc.wait(timeout=60)
        shutil.rmtree(shared, ignore_errors=True)
    assert not folder.exists()


def test_analyse_again_after_the_upload_is_deleted(server, sample_dir, tmp_path):
    """A person who comes back after the upload clock (the fixture's: 2 s) and presses Analyse again gets
    the same answer from the session's copy, not "expired"; a session that never analysed it still does."""
    import time

    demo, _ = server
    predict = next(fn for fn in demo.fns.values() if fn.name == "predict").fn
    (tmp_path / "upload").mkdir()
    upload = _save(_ultrasound(sample_dir), tmp_path / "upload" / "frame.png")  # stands for gradio's upload of it
    first = predict(str(upload), "tiny-resnet", 0.45, "unseen", "", None)
    deadline = time.time() + 30
    while upload.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert not upload.exists()  # the upload clock deleted it
    again = predict(str(upload), "tiny-resnet", 0.45, "unseen", "", first[3])
    assert again[4]["scores"] == pytest.approx(first[4]["scores"], abs=1e-6) and again[4]["answer"] == first[4]["answer"]
    assert "reduced copy" not in again[2]  # a frame no larger than the page's copy is analysed exactly
    with pytest.raises(Exception, match="the upload has expired"):
        predict(str(upload), "tiny-resnet", 0.45, "unseen", "", None)
