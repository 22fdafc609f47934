"""Mutation testing: does the suite notice when a module's code is changed in a small, realistic way?

    pip install "mutmut>=3.3"
    python benchmarks/mutation.py [--modules metrics reliability ...] [--children 2] [--keep]

For each module, mutmut (https://github.com/boxed/mutmut) makes small changes one at a time (``<`` to
``<=``, a constant off by one, an argument dropped, ``and`` to ``or`` ...) to the lines the selected
tests cover, and runs those tests against each. A *killed* mutant made a test fail; a *survivor*
is a change no test noticed: either a missing test or an equivalent change (read them with
``mutmut show NAME`` in the work folder, kept with ``--keep``). Prints killed / total per module
and the survivors' names. Slow (minutes per module on 2 cores), so not part of CI; each module's
tests below are the fast ones that exercise it (no end-to-end training run: mutmut forks a fresh
test session per mutant).

Modules are the ones where a silent bug costs a patient's trust: splitting and groups (data),
duplicates and leakage (audit), metrics, intervals and calibration (metrics), the guard and the
prediction sets (reliability), the prediction-file schema and the folder (folder), Grad-CAM (explain) and the
Predictor (predict); the app's serving threads and memory budget (serving) and its decoder (preprocess).
Run a checkout's own tests against its own code: copy this file into another checkout's benchmarks/ to
score that checkout (before / after).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: module -> the fast tests that exercise it (pytest node ids or paths, with -k / -m filters)
TARGETS: dict[str, list[str]] = {
    "metrics": ["tests/test_bite.py::test_class_weights_on_imbalanced_labels_and_the_loss", "tests/test_sources.py::test_frame_mean_and_guard_report",
                "tests/test_training.py::test_bootstrap_intervals_cover_the_estimate_and_resample_groups", "tests/test_compare.py",
                "tests/test_training.py::test_metrics_equal_sklearn", "tests/test_training.py::test_frame_logits_average_view_probabilities",
                "tests/test_training.py::test_ece_and_temperature", "tests/test_metrics.py"],
    "reliability": ["tests/test_reliability.py", "tests/test_sources.py", "-m", "not slow"],
    "data": ["tests/test_data.py", "tests/test_groups.py", "tests/test_sources.py::test_sources_are_named_recorded_and_split_by_source_and_class", "-m", "not slow"],
    "audit": ["tests/test_audit.py", "tests/test_bite.py::test_near_duplicate_threshold_is_inclusive_at_its_edge", "-m", "not slow"],
    "folder": ["tests/test_folder.py::test_write_predictions_cells_round_trip", "tests/test_folder.py::test_only_the_folder_module_names_the_folder_files"],
    # Grad-CAM and the Predictor's predict(): test_explain's untrained tiny Predictors (no training run per mutant).
    "explain": ["tests/test_explain.py", "-k", "not batch_cli and not localize and not randomised"],
    "predict": ["tests/test_predictor.py", "tests/test_explain.py", "-k", "not batch_cli and not localize and not randomised"],
    # The app's model threads and memory budget: their unit tests (not the one that trains a model).
    "serving": ["tests/test_serving.py", "-k", "not batched_prediction"],
    # The decoder: every fast test that decodes, by name, wherever it lives (no test that needs a trained model or a server).
    "preprocess": ["tests/", "-m", "not slow", "-k", "(preprocess or open_image or bomb or decod or to_rgb or crop) and not costs_a_frame and not old_limit "
                   "and not burst and not space and not app_"],
}


def run_module(module: str, tests: list[str], children: int, keep: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"mutmut-{module}-"))
    for name in ("src", "tests"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyi", "*.egg-info"))
    config = (REPO / "pyproject.toml").read_text()
    config += ("\n[tool.mutmut]\n"
               f'source_paths = ["src/"]\nonly_mutate = ["src/thyroid_classifier/{module}.py"]\n'
               f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
               'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q", "-o", "addopts="]\n'
               # torch is not fork-safe once its thread pools run: a fork server that only imports and forks.
               'process_isolation = "forkserver"\n')
    (work / "pyproject.toml").write_text(config)
    # Before mutmut starts: a PYTHONPATH entry that does not exist yet is skipped for good by the
    # import system, and the tests would then import the unmutated package.
    (work / "mutants" / "src").mkdir(parents=True)
    if (REPO.parent / "shared").exists():  # tests on real frames read ../shared
        os.symlink(REPO.parent / "shared", work.parent / "shared") if not (work.parent / "shared").exists() else None
    started = time.time()
    env = {**os.environ, "PYTHONPATH": str(work / "mutants" / "src"), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(children)], cwd=work, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    subprocess.run([sys.executable, "-m", "mutmut", "export-cicd-stats"], cwd=work, env=env, capture_output=True, check=False)
    stats_path = work / "mutants" / "mutmut-cicd-stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    results = subprocess.run([sys.executable, "-m", "mutmut", "results"], cwd=work, env=env, capture_output=True, text=True, check=False).stdout
    survivors = [line.split(":")[0].strip() for line in results.splitlines() if line.strip().endswith("survived")]
    out = {"module": module, "stats": stats, "survivors": survivors, "minutes": round((time.time() - started) / 60, 1), "work": str(work)}
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--children", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--keep", action="store_true", help="keep each module's work folder (to read survivors with `mutmut show`)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if shutil.which("mutmut") is None and subprocess.run([sys.executable, "-m", "mutmut", "--version"], capture_output=True).returncode:
        print('error: mutmut is not installed (pip install "mutmut>=3.3")', file=sys.stderr)
        return 2
    rows = []
    for module in args.modules:
        r = run_module(module, TARGETS[module], args.children, args.keep)
        s = r["stats"]
        killed, total = s.get("killed", 0), s.get("total", 0)
        score = f"{killed / total:.0%}" if total else "n/a"
        print(f"{module}: {killed} of {total} mutants killed ({score}); survived {s.get('survived', '?')}, "
              f"no tests {s.get('no_tests', '?')}, timeout {s.get('timeout', '?')}, {r['minutes']} min"
              + (f"; work folder {r['work']}" if args.keep else ""), flush=True)
        for name in r["survivors"]:
            print(f"  survived: {name}")
        rows.append(r)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
