"""The Hub command line: ``python -m thyroid_classifier.hub push | card | space``. The library code it
calls lives below it (:mod:`publish`, :mod:`card`, :mod:`space`); nothing imports this module but
the entry point."""

from __future__ import annotations

import logging
from pathlib import Path

from .folder_files import METRICS
from .publish import check_push_access, push_folder

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m thyroid_classifier.hub", description="Model cards and Hub uploads for trained model folders.")
    sub = parser.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="render the card and push a trained model folder")
    push.add_argument("folder", type=Path)
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    card = sub.add_parser("card", help="render the card into FOLDER/README.md (no network)")
    card.add_argument("folder", type=Path)
    card.add_argument("--repo_id", default=None)
    space = sub.add_parser("space", help="write a ready Hugging Face Space (gradio) for a model folder or Hub id, and optionally push it")
    space.add_argument("model", help="a model folder written by train.py, or a Hub id")
    space.add_argument("out_dir", type=Path, help="a new folder for the Space")
    space.add_argument("--push", metavar="SPACE_ID", default=None, help="also create / update this Space (e.g. someone/thyroid-demo)")
    space.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "space":
        from .space import push_space, write_space

        try:
            files = write_space(args.model, args.out_dir)
            print(f"wrote {args.out_dir}: {len(files)} files (app.py, README.md, requirements.txt, thyroid_classifier/"
                  + (", model/" if any(f.startswith("model/") for f in files) else "") + "); try it: cd " + f"{args.out_dir} && python app.py")
            if args.push:
                push_space(args.out_dir, args.push, private=args.private)
                print(f"pushed to https://huggingface.co/spaces/{args.push}")
        except Exception as exc:  # noqa: BLE001 - one clear line
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if not (args.folder / METRICS).is_file():
        print(f"error: {args.folder} is not a model folder written by train.py (no metrics.json)", file=sys.stderr)
        return 2
    if args.command == "card":
        from .card import write_card

        print(f"wrote {write_card(args.folder, args.repo_id)}")
        return 0
    try:
        check_push_access(args.repo_id, private=args.private)
        names = push_folder(args.folder, args.repo_id, private=args.private)
    except Exception as exc:  # noqa: BLE001 - one clear line; the folder is untouched
        print(f"error: could not push {args.folder} to {args.repo_id}: {exc}", file=sys.stderr)
        return 2
    print(f"pushed {len(names)} files to {args.repo_id}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
