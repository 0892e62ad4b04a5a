"""The same algorithms in two benches (e.g. float32 against ``--quantize float16``): bytes and Dice side by side.

    python benchmark/compare_runs.py BASE/results.json OTHER/results.json [--algos lcfed,fedavg] [--out FILE.md]

Per algorithm in both files, over the seeds both ran: the bytes each site sent and received per round
(mean over seeds, measured on the wire by the bench) and their ratio OTHER/BASE, the mean test Dice over
seeds of each, and OTHER - BASE per seed (paired: the same seed starts from the same initial weights) with
a Wilcoxon signed-rank test over the test cases (each case's Dice averaged over seeds), as ``lcfed bench``
computes it. Writes a markdown table (to ``--out`` too, with the command).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any


def compare_files(base: Path, other: Path, algos: list[str] | None = None) -> list[dict[str, Any]]:
    from lcfed.ops.bench import paired, summarize

    runs_a, runs_b = (json.loads(Path(f).read_text())["runs"] for f in (base, other))
    names = [a for a in dict.fromkeys(r["algo"] for r in runs_a) if any(r["algo"] == a for r in runs_b)]
    if algos:
        missing = [a for a in algos if a not in names]
        if missing:
            raise SystemExit(f"error: {', '.join(missing)} not in both {base} and {other}")
        names = algos
    rows = []
    for a in names:
        seeds = {r["seed"] for r in runs_a if r["algo"] == a} & {r["seed"] for r in runs_b if r["algo"] == a}
        mine = [r for r in runs_a if r["algo"] == a and r["seed"] in seeds]  # the seeds both ran, only
        theirs = [r for r in runs_b if r["algo"] == a and r["seed"] in seeds]
        s_a, s_b = summarize(mine)[a], summarize(theirs)[a]
        # paired per seed and per test case, the two sides told apart by name
        test = paired([{**r, "algo": "base"} for r in mine] + [{**r, "algo": "other"} for r in theirs], "other", "base")
        rows.append(
            {
                "algo": a,
                "seeds": sorted(seeds),
                "sent": (s_a["bytes_sent_per_round"], s_b["bytes_sent_per_round"]),
                "received": (s_a["bytes_received_per_round"], s_b["bytes_received_per_round"]),
                "dice": (s_a["mean"]["dice"], s_b["mean"]["dice"]),
                "difference": test["per_seed_difference"],
                "difference_mean": test["dice_difference_mean"],
                "wilcoxon_p": test["wilcoxon_p"],
                "n_cases": test["n_cases"],
            }
        )
    return rows


def table(rows: list[dict[str, Any]], base_label: str, other_label: str) -> str:
    lines = [
        f"| algorithm | seeds | kB sent/round/site {base_label} -> {other_label} (x) | kB received (x) | "
        f"mean Dice {base_label} | mean Dice {other_label} | difference per seed | mean difference | Wilcoxon p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        (sa, sb), (ra, rb) = r["sent"], r["received"]
        da, db = r["dice"]
        lines.append(
            f"| {r['algo']} | {','.join(map(str, r['seeds']))} | {sa / 1e3:.1f} -> {sb / 1e3:.1f} ({sb / sa:.3f}) | "
            f"{ra / 1e3:.1f} -> {rb / 1e3:.1f} ({rb / ra:.3f}) | {da['mean']:.4f} ± {da['std']:.4f} | "
            f"{db['mean']:.4f} ± {db['std']:.4f} | {' / '.join(f'{d:+.4f}' for d in r['difference'])} | "
            f"{r['difference_mean']:+.4f} | {r['wilcoxon_p']:.3g} ({r['n_cases']} cases) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="results.json of the reference bench (e.g. float32)")
    parser.add_argument("other", help="results.json of the bench to compare (e.g. --quantize float16)")
    parser.add_argument("--algos", help="comma-separated (default: every algorithm in both)")
    parser.add_argument("--labels", default="base,other", help="column labels for the two, e.g. fp32,fp16")
    parser.add_argument("--out", help="also write the table here (markdown, with the command)")
    args = parser.parse_args()
    algos = [a for a in (args.algos or "").split(",") if a]
    labels = args.labels.split(",")
    if len(labels) != 2:
        raise SystemExit("error: --labels takes two names, e.g. fp32,fp16")
    text = table(compare_files(Path(args.base), Path(args.other), algos or None), *labels)
    print(text)
    if args.out:
        command = "python " + " ".join(shlex.quote(a) for a in ["benchmark/compare_runs.py", *sys.argv[1:]])
        Path(args.out).write_text(f"Command: `{command}`\n\n{text}\n")


if __name__ == "__main__":
    main()
