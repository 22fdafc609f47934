"""`python -m thyroid_classifier.datasets fetch`: the public data sets from their homes, served here by a
local HTTP server on 127.0.0.1 (never the internet), checked file by file, written whole or not at all."""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from thyroid_classifier.datasets import REGISTRY, FetchError, PublicDataSet, fetch, main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture()
def serve(tmp_path):
    """``serve(folder) -> base URL``: a local HTTP server for the files of ``folder``."""
    servers = []

    def start(folder: Path) -> str:
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:  # no request lines in the test output
                pass

        handler = functools.partial(Quiet, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()


def _tiny_set(tmp_path: Path) -> tuple[PublicDataSet, Path]:
    """A two-frame data set shipped as an archive (nested folder, a case file beside), and its checksum list."""
    home = tmp_path / "home"
    home.mkdir()
    frames = {"1_1.jpg": b"frame one", "2_1.jpg": b"frame two"}
    with zipfile.ZipFile(home / "set.zip", "w") as z:
        for name, data in frames.items():
            z.writestr(f"release/{name}", data)
        z.writestr("release/1.xml", "<case/>")
    listing = tmp_path / "set.csv"
    with listing.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "case", "label", "md5", "member"])
        w.writerow(["images/benign/1_1.jpg", "1", "benign", hashlib.md5(frames["1_1.jpg"]).hexdigest(), "1_1.jpg"])
        w.writerow(["images/malignant/2_1.jpg", "2", "malignant", hashlib.md5(frames["2_1.jpg"]).hexdigest(), "2_1.jpg"])
    return PublicDataSet(name="tiny", home="here", url="", shipped_as="archive", checksums=listing, extra_suffix=".xml"), home


def test_a_data_set_is_laid_out_with_its_manifest(tmp_path, serve):
    spec, home = _tiny_set(tmp_path)
    spec = PublicDataSet(**{**spec.__dict__, "url": serve(home) + "/set.zip"})
    said = []
    dest = fetch(spec, tmp_path / "data", say=said.append)
    assert (dest / "images" / "benign" / "1_1.jpg").read_bytes() == b"frame one"
    assert (dest / "xml" / "1.xml").is_file()
    with (dest / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["1", "2"] and "member" not in rows[0]  # the patient groups the splits keep together
    assert "1 benign, 1 malignant" in said[-1] and "every file checked" in said[-1]
    assert fetch(spec, tmp_path / "data", say=said.append) == dest and "already" in said[-1]  # a second fetch checks, downloads nothing


def test_a_file_that_does_not_check_leaves_nothing_written(tmp_path, serve):
    spec, home = _tiny_set(tmp_path)
    with zipfile.ZipFile(home / "set.zip", "w") as z:  # the second frame changed upstream
        z.writestr("release/1_1.jpg", b"frame one")
        z.writestr("release/2_1.jpg", b"frame 2")
    spec = PublicDataSet(**{**spec.__dict__, "url": serve(home) + "/set.zip"})
    with pytest.raises(FetchError, match=r"1 of 2 files did not check: 2_1\.jpg \(checksum differs\); nothing was written"):
        fetch(spec, tmp_path / "data", say=lambda _: None)
    assert not any((tmp_path / "data").iterdir())  # no data set, no partial folder


def test_offline_is_one_clear_line_and_nothing_written(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["fetch", "les3bdd", "--to", str(tmp_path), "--les3bdd_url", f"http://127.0.0.1:{port}/repo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach http://127.0.0.1:") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not (SHARED / "ddti" / "images").is_dir(), reason="../shared/data not found (CI lays it beside the clone)")
def test_both_public_sets_from_local_homes_match_the_shared_copies(tmp_path, serve, capsys):
    """DDTI as its publisher ships it (one archive of frames and case files) and LES3BDD as its repository
    holds it (the origin paths), served locally: the fetched folders hold the same bytes as ../shared's."""
    homes = tmp_path / "homes"
    (homes / "repo").mkdir(parents=True)
    with zipfile.ZipFile(homes / "ddti.zip", "w") as z:
        for path in sorted((SHARED / "ddti").rglob("*")):
            if path.suffix in (".jpg", ".xml"):
                z.write(path, f"DDTI/{path.name}")
    with (SHARED / "les3bdd" / "manifest.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            target = homes / "repo" / row["origin"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((SHARED / "les3bdd" / row["file"]).read_bytes())
    base = serve(homes)
    out = tmp_path / "data"
    assert main(["fetch", "ddti", "les3bdd", "--to", str(out), "--ddti_url", f"{base}/ddti.zip", "--les3bdd_url", f"{base}/repo"]) == 0
    print(capsys.readouterr().out)
    for name in REGISTRY:
        with (SHARED / name / "manifest.csv").open(newline="") as f:
            shared = list(csv.DictReader(f))
        for row in shared:
            assert (out / name / row["file"]).read_bytes() == (SHARED / name / row["file"]).read_bytes()
        with (out / name / "manifest.csv").open(newline="") as f:
            assert [r["case"] for r in csv.DictReader(f)] == [r["case"] for r in shared]
    assert len(list((out / "ddti" / "xml").glob("*.xml"))) == len(list((SHARED / "ddti" / "xml").glob("*.xml")))


def _readme_public_commands() -> list[list[str]]:
    """The README's public-model commands, as argument lists (continuation lines joined)."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme[readme.index("## The public model"):].split("```bash", 1)[1].split("```", 1)[0]
    lines = [shlex.split(line.split("#", 1)[0]) for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.strip()]
    return [line for line in lines if line]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "ddti" / "images").is_dir(), reason="../shared/data not found (CI lays it beside the clone)")
def test_the_readmes_public_model_commands_run_from_fetched_data(tmp_path, serve, tiny_models, monkeypatch):
    """The README's commands, run as written from a fresh folder: fetch (from local homes), then train with
    the Hub's Lite0 replaced by a local checkpoint (no Hub here) and a small budget."""
    fetch_cmd, train_cmd, app_cmd = _readme_public_commands()
    assert fetch_cmd[:4] == ["python", "-m", "thyroid_classifier.datasets", "fetch"]
    homes = tmp_path / "homes"
    (homes / "repo").mkdir(parents=True)
    with zipfile.ZipFile(homes / "ddti.zip", "w") as z:
        for path in sorted((SHARED / "ddti").rglob("*")):
            if path.suffix in (".jpg", ".xml"):
                z.write(path, path.name)
    with (SHARED / "les3bdd" / "manifest.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            (homes / "repo" / row["origin"]).parent.mkdir(parents=True, exist_ok=True)
            (homes / "repo" / row["origin"]).write_bytes((SHARED / "les3bdd" / row["file"]).read_bytes())
    base = serve(homes)
    monkeypatch.chdir(tmp_path)
    assert main(fetch_cmd[3:] + ["--ddti_url", f"{base}/ddti.zip", "--les3bdd_url", f"{base}/repo"]) == 0

    from thyroid_classifier.locations import is_local
    from thyroid_classifier.training import main as train_main

    assert train_cmd[:2] == ["python", "train.py"]
    args = train_cmd[2:]
    model = args[args.index("--model") + 1]
    assert not is_local(model) and model.startswith("timm/")  # a Hub id: what a user without ../shared can reach
    args[args.index("--model") + 1] = str(tiny_models["tiny-resnet"])
    assert train_main(args + ["--image_size", "32", "--num_train_epochs", "1", "--max_train_samples", "48", "--max_eval_samples", "24",
                              "--bootstrap_resamples", "20", "--learning_rate", "3e-4"]) == 0
    out = Path(args[args.index("--output_dir") + 1]) / "tiny-resnet"
    assert (out / "loso_metrics.json").is_file() and (out / "reliability.json").is_file()
    assert app_cmd[:2] == ["python", "app.py"] and app_cmd[app_cmd.index("--model") + 1].startswith("outputs/public/")
