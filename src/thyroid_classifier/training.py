"""The training job: audit and split the data once, then for each model train and evaluate it
(:mod:`fit`), or cross-validate it (:mod:`cv`), or hold each source out in turn (:mod:`loso`);
compare the models and push them to the Hub on request. ``train.py`` is ``main``.

Module map: :mod:`arguments` (the flags), :mod:`transforms` (image → tensor, cached), :mod:`tuning`
(optimizer, schedule, callbacks), :mod:`fit` (one model), :mod:`cv` / :mod:`loso` (validation
schemes), :mod:`folder` (everything written to disk), :mod:`card` (the model card).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .adaptation import StartingModel, align_labels
from .arguments import DataArguments, ModelArguments, RunArguments, parse_args
from .audit import audited_dataset
from .cv import cross_validate
from .data import GroupSpec
from .fit import distributed_state, train_one
from .locations import check_hub_model, is_local
from .publish import check_push_access, dataset_folder, push_folder
from .metrics import HEADLINE
from .models import HUB_HELP, ModelSpec, get_spec
from .plots import plot_comparison
from .sample import builtin_sample

logger = logging.getLogger(__name__)

__all__ = ["DataArguments", "ModelArguments", "RunArguments", "main", "parse_args", "run"]


def check_models_reachable(specs: Sequence[ModelSpec], init: str) -> None:
    """Before any data is read or any training time spent: can every checkpoint be had?"""
    if init != "pretrained":
        return
    for spec in specs:
        if not is_local(spec.checkpoint):
            check_hub_model(spec.checkpoint, what_to_do=HUB_HELP)


def limit_samples(dataset, max_train: int | None, max_eval: int | None, seed: int):
    """Each split cut to a seeded random subset of at most ``max_train`` (train) / ``max_eval``
    (validation, test) examples, as transformers' examples do; unchanged when both are None."""
    for name in list(dataset):
        limit = max_train if name == "train" else max_eval
        if limit is not None and limit < len(dataset[name]):
            if limit < 1:
                raise ValueError(f"--max_{'train' if name == 'train' else 'eval'}_samples must be at least 1, not {limit}")
            dataset[name] = dataset[name].shuffle(seed=seed).select(range(limit)).flatten_indices()
    return dataset


def hub_repos(run_args: RunArguments, specs: Sequence[ModelSpec]) -> dict[str, str]:
    """Model name → Hub repository for ``--push_to_hub`` (empty when not pushing)."""
    if not run_args.push_to_hub:
        return {}
    if not run_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. someone/thyroid-resnet50)")
    if len(specs) == 1:
        return {specs[0].name: run_args.hub_model_id}
    return {s.name: f"{run_args.hub_model_id}-{s.name}" for s in specs}


def write_comparison(results: dict[str, dict], output_dir: Path) -> None:
    """``comparison.png`` and ``comparison.md``: the models side by side with their intervals."""
    if not results:
        return
    split = next(iter(results.values()))["split"]
    table = {name: r[r["split"]] for name, r in results.items()}
    plot_comparison(table, output_dir / "comparison.png", split)
    lines = [
        f"# Model comparison ({split} split)",
        "",
        "95% bootstrap intervals (resampling patients/cases). ECE: expected calibration error, lower is better.",
        "",
        "| model | init | n | " + " | ".join(HEADLINE) + " |",
        "|---|---|---|" + "---|" * len(HEADLINE),
    ]
    for name, r in results.items():
        cells = [f"{table[name][m]['value']:.3f} [{table[name][m]['ci'][0]:.3f}, {table[name][m]['ci'][1]:.3f}]" for m in HEADLINE]
        lines.append(f"| {name} | {r['init']} | {r['n']} | " + " | ".join(cells) + " |")
    lines += ["", "Per-class recall:", ""]
    for name, r in results.items():
        per_class = table[name]["per_class"]
        lines.append(f"- {name}: " + ", ".join(f"{label} {v['recall']:.3f} (n={v['support']})" for label, v in per_class.items()))
    (output_dir / "comparison.md").write_text("\n".join(lines) + "\n")


def run(data_args: DataArguments, model_args: ModelArguments, run_args: RunArguments, callbacks: Sequence = ()) -> dict[str, dict]:
    """The whole job: audit, split, train and evaluate each model, compare. Returns each model's metrics."""
    state = distributed_state()
    # A model folder this project trained is a starting point (a site adapting it), not a new model.
    starts = {name: StartingModel.read(name) for name in model_args.model}
    specs = [starts[name].spec() if starts[name] else get_spec(name) for name in model_args.model]
    start_of = {spec.name: starts[name] for spec, name in zip(specs, model_args.model, strict=True)}
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"two models share an output folder name: {[s.name for s in specs]}")
    # Settings first: a wrong flag should not wait for the Hub or the data.
    if run_args.cv == 1 or run_args.cv < 0:
        raise ValueError("--cv needs K >= 2 folds")
    if run_args.loso and run_args.cv:
        raise ValueError("--loso and --cv are two ways to validate: run them one at a time")
    if run_args.loso and len(data_args.data_dir or []) < 2:
        raise ValueError("--loso needs at least two --data_dir folders (one per source)")
    if run_args.ema_decay > 0 and run_args.select_best:
        raise ValueError("--ema_decay keeps the weights' average as the model; drop --select_best (a best checkpoint would replace it)")
    for start in filter(None, starts.values()):
        if run_args.cv or run_args.loso:
            raise ValueError(f"--model {start.location} starts from a trained model: --cv and --loso would score folds on sources "
                             "it may already have seen; adapt it with a plain run (its test split is measured on frames it never saw)")
        if model_args.init != "pretrained":
            raise ValueError(f"--model {start.location} is a trained model: --init {model_args.init} would throw its weights away")
        if data_args.preprocessor() != start.preprocessor:
            logger.warning("%s keeps its own preprocessing %s (not the flags' %s)", start.location, start.preprocessor, data_args.preprocessor())
    if not 0 < run_args.headline_max_error < 1:
        raise ValueError(f"--headline_max_error must be in (0, 1), not {run_args.headline_max_error}")
    if not 0 <= run_args.ema_decay < 1:
        raise ValueError(f"--ema_decay must be in [0, 1), not {run_args.ema_decay}")
    check_models_reachable(specs, model_args.init)
    repos = hub_repos(run_args, specs)
    if repos and state.is_main_process:
        for repo_id in repos.values():  # each repository created and writable before any training
            check_push_access(repo_id, private=run_args.hub_private)
    data_dir = data_args.data_dir
    if data_args.dataset_name:
        if data_dir:
            raise ValueError("give --data_dir or --dataset_name, not both")
        with state.main_process_first():
            data_dir = [str(dataset_folder(data_args.dataset_name))]
    if data_dir is None:
        data_dir = str(builtin_sample())
        logger.warning("no --data_dir given: using the built-in SYNTHETIC sample at %s (it demonstrates the pipeline only)", data_dir)
    groups = GroupSpec(csv_path=Path(data_args.group_csv) if data_args.group_csv else None, column=data_args.group_column, pattern=data_args.group_pattern)
    with state.main_process_first():
        dataset, report = audited_dataset(
            data_dir,
            drop_duplicates=data_args.drop_duplicates,
            near_threshold=data_args.near_threshold,
            progress=state.is_main_process,
            # Cross-validation folds are made from all the data, so nothing is held out here.
            validation_size=0.0 if run_args.cv else data_args.validation_size,
            test_size=0.0 if run_args.cv else data_args.test_size,
            seed=run_args.seed,
            groups=groups,
            source_names=data_args.source_names,
        )
    dataset = limit_samples(dataset, data_args.max_train_samples, data_args.max_eval_samples, run_args.seed)
    if state.is_main_process:
        print(report.summary())
    output_dir = Path(run_args.output_dir)
    results = {}
    for spec in specs:
        if run_args.cv:
            results[spec.name] = cross_validate(spec, dataset, report, data_args, model_args, run_args, callbacks)
            continue
        loso = None
        if run_args.loso:
            from .loso import leave_one_source_out

            loso = leave_one_source_out(spec, dataset, report, data_args, model_args, run_args, callbacks)
        start = start_of[spec.name]
        data = align_labels(dataset, start.labels, start.location) if start else dataset
        results[spec.name] = train_one(spec, data, report, data_args, model_args, run_args, callbacks, loso=loso, start=start).metrics
    if run_args.cv:
        return results
    if state.is_main_process:
        write_comparison(results, output_dir)
        for name, repo_id in repos.items():
            try:
                pushed = push_folder(output_dir / name, repo_id, private=run_args.hub_private)
                print(f"{name}: pushed {len(pushed)} files to {repo_id}")
            except Exception as exc:  # noqa: BLE001 - the trained folder stays on disk whatever happens
                print(f"{name}: push to {repo_id} failed ({type(exc).__name__}: {exc}); the model is safe in {output_dir / name}. "
                      f"Retry with: python -m thyroid_classifier.hub push {output_dir / name} {repo_id}", file=sys.stderr)
        for name, r in results.items():
            m = r[r["split"]]
            print(f"{name}: {r['split']} macro ROC AUC {m['roc_auc']['value']:.3f} [{m['roc_auc']['ci'][0]:.3f}, {m['roc_auc']['ci'][1]:.3f}], "
                  f"balanced accuracy {m['balanced_accuracy']['value']:.3f}, n={r['n']} -> {output_dir / name}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    from .locations import HubUnreachableError
    from .data import DataError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "huggingface_hub", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    data_args, model_args, run_args = parse_args(argv)
    try:
        run(data_args, model_args, run_args)
    except (HubUnreachableError, DataError, ValueError) as exc:
        logging.getLogger("thyroid_classifier").error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
