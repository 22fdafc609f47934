"""`python -m thyroid_classifier.hub space`: a Space folder that runs on its own, offline, and is pushed in one commit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from thyroid_classifier.hub import main as hub_main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_space_folder_launches_offline_and_predicts(short_run, sample_dir, tmp_path, capsys):
    from gradio_client import Client, handle_file

    out, _ = short_run
    space = tmp_path / "space"
    assert hub_main(["space", str(out / "tiny-resnet"), str(space)]) == 0
    assert "python app.py" in capsys.readouterr().out
    files = {p.relative_to(space).as_posix() for p in space.rglob("*") if p.is_file()}
    assert {"app.py", "README.md", "requirements.txt", "thyroid_classifier/app.py", "thyroid_classifier/model_card.md",
            "model/model.safetensors", "model/config.json", "model/ultrasound_processor.py", "model/guard.safetensors"} <= files
    assert not any(f.startswith("model/checkpoints") or f in ("model/audit.json", "model/predictions_test.csv", "model/training_args.bin") for f in files)
    front = (space / "README.md").read_text().split("---")[1]
    import gradio

    for line in ("sdk: gradio", f"sdk_version: {gradio.__version__}", "app_file: app.py"):
        assert line in front
    requirements = (space / "requirements.txt").read_text()
    assert "gradio" in requirements and "transformers" in requirements and "pytest" not in requirements

    # Run as a Space runs it (python app.py in the folder), offline, on a free port; the package is the copy.
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_ID", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", GRADIO_SERVER_PORT=str(port))
    where = subprocess.run([sys.executable, "-c", "import thyroid_classifier; print(thyroid_classifier.__file__)"], cwd=space, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(space))
    log = (tmp_path / "space.log").open("w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert proc.poll() is None, (tmp_path / "space.log").read_text()
                time.sleep(1)
        else:
            pytest.fail("the Space did not start: " + (tmp_path / "space.log").read_text())
        frame = sample_dir / "malignant" / "3000_1.png"
        result = client.predict(handle_file(str(frame)), "model", 0.45, api_name="/predict")
        label, message, data = result[0], result[2], result[-1]
        assert set(data["scores"]) == {"normal", "benign", "malignant"} and label["label"] == data["answer"] and data["reason"] in message
        # The Space answers as the model folder does (its crop, calibration, guard and sets all travelled) ...
        from thyroid_classifier.predict import Predictor

        [local] = Predictor.from_pretrained(str(out / "tiny-resnet")).predict([frame], explain=False)
        assert data["scores"] == pytest.approx(local.probabilities, abs=1e-5)
        assert (data["answer"], data["reason"], data["prediction_set"], data["flagged"]) == (local.headline, local.reason, local.prediction_set, local.flagged)
        # ... and its page shows the folder's evaluation, not "No evaluation found".
        import httpx

        page = json.dumps(httpx.get(f"http://127.0.0.1:{port}/config").json())
        assert "In-source evaluation" in page and "No evaluation found" not in page
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_space_is_pushed_in_one_commit_after_checking_access(short_run, tmp_path, monkeypatch):
    from test_hub import fake_hf_api

    from thyroid_classifier.space import push_space, write_space

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out, _ = short_run
    write_space(str(out / "tiny-vgg"), tmp_path / "space")
    with pytest.raises(FileExistsError):
        write_space(str(out / "tiny-vgg"), tmp_path / "space")  # never over an earlier folder
    api = fake_hf_api()
    push_space(tmp_path / "space", "someone/thyroid-demo", api=api)
    api.create_repo.assert_called_once_with("someone/thyroid-demo", private=False, exist_ok=True, repo_type="space", space_sdk="gradio")
    api.auth_check.assert_called_once_with("someone/thyroid-demo", repo_type="space", write=True)
    assert api.upload_folder.call_args.kwargs["delete_patterns"] == "*" and api.upload_folder.call_args.kwargs["repo_type"] == "space"
    assert "app.py" in api.uploaded and "model/model.safetensors" in api.uploaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_main(["space", str(out / "tiny-vgg"), str(tmp_path / "other"), "--push", "someone/x"]) == 2  # offline: a clear error
