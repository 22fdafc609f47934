"""The headline rule's tables for docs/results-sources.md, from a model folder trained with --loso:
the candidates cross-fitted across unseen sources (loso_metrics.json), the rule on the in-source test
split before and after (metrics.json), and the guard's flagged share per source beside them.

    python scripts/headline_tables.py outputs/public/timm-efficientnet_lite0.ra_in1k
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from thyroid_classifier.loso import crossfit_table


def pct(m: dict) -> str:
    v, ci = m["value"], m["ci"]
    if v != v:
        return "n/a"
    return f"{v:.0%} [{ci[0]:.0%}, {ci[1]:.0%}]" if ci[0] == ci[0] else f"{v:.0%}"


def num(m: dict) -> str:
    v, ci = m["value"], m["ci"]
    return "n/a" if v != v else (f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci[0] == ci[0] else f"{v:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    metrics = json.loads((args.folder / "metrics.json").read_text())
    loso = json.loads((args.folder / "loso_metrics.json").read_text())
    reliability = json.loads((args.folder / "reliability.json").read_text())
    print(crossfit_table(loso["crossfit"]))
    print()
    split = metrics["split"]
    headline = metrics["reliability"]["headline"]
    rows = {"before: in-source sets and guard, any single-class set headlined": headline[f"{split}_before"],
            **{f"after: {name} regime" + (" (the default)" if name == "unseen" else " (frame said to be in-source)"): r
               for name, r in headline[split].items()}}
    print(f"In-source {split} split (n = {metrics['n']}), the rule before and after; 95% intervals resampling patients")
    print("| rule | set coverage | mean set size | headlined | right among headlined | error 95% upper bound |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        err = r["error_headlined"]
        right = {"value": 1 - err["value"], "ci": [1 - err["ci"][1], 1 - err["ci"][0]]}
        print(f"| {name} | {num(r['coverage'])} | {num(r['mean_set_size'])} | {pct(r['share_headlined'])} ({r['n_headlined']}/{r['n']}) | "
              f"{pct(right)} | {r['error_headlined_upper_95']:.0%} |")
    print()
    print("Regimes in reliability.json:")
    for name, r in reliability["regimes"].items():
        t = r["headline_threshold"]
        print(f"- {name}: fitted on {r['evidence']}; headline threshold {'none (never)' if t is None else t}; "
              f"set thresholds {[None if x is None else round(x, 3) for x in r['thresholds']]}; there: headlined "
              f"{r['measured']['n_headlined']}/{r['measured']['n']}, wrong {r['measured']['n_wrong_headlined']}")
    print()
    print("Guard, flagged share per source:")
    g = metrics["reliability"].get("guard") or {}
    if split in g:
        print(f"- {split} split (in-source): {g[split]['share_flagged']:.0%}")
    for name, r in loso["held_out"].items():
        if r.get("guard"):
            print(f"- {name} as the unseen source (fold model's guard): {r['guard']['share_flagged']:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
