"""The one benchmark harness: `configs x seeds -> measure(config, seed) -> row`, recorded and compared.

A benchmark declares what it compares and how one measurement is taken; the harness does the rest the same way
for every benchmark:

    sweep = Sweep("handoff", configs={"drain": {...}, "kill": {...}}, seeds=[0, 1, 2], measure=measure)
    record = run_record(args)                                   # machine, commit, command line, start time
    rows = run_sweep(sweep, results_dir(args))                  # progress line per row, rows cached on disk
    table = paired_table(rows, "seconds", baseline="kill", better="lower")
    finish(sweep, args, record, rows, paired=[table])           # JSON (+ Markdown) under benchmarks/results/

- **CLI** (`parser`): `--quick` (its own small seeds and sizes, written under outputs/bench/quick/, never over a
  full result), `--seeds`, `--fresh` (ignore cached rows).
- **Record** (`run_record`): the machine (cores, load, CPU steal, versions; `_common.machine_info`), the commit
  (`+dirty` when the code had edits), the command line, start and end times.
- **Seeds and order**: every config is measured on every seed, interleaved (seed-major: all configs on seed 0,
  then seed 1, ...), so that load from other processes on shared cores hits all configs alike; with
  `alternate`, every other seed runs the configs in reverse order, with `rotate`, each seed starts one config
  later.
- **Resume**: each finished row is appended to `outputs/bench/rows/<name>.rows.jsonl` as it is measured; a killed benchmark
  rerun with the same configs and seeds measures only the rows it lacks. `saved_rows` reads the rows of a written
  result back, `measured_rows` every row measured so far (a report regenerated from a clean checkout).
- **Paired tables** (`paired_table`): each config against a baseline over the seeds they share, with the 95%
  interval and verdict of `rayops.paired` (the one verdict of the project).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from _common import (
    QUICK_RESULTS,
    RESULTS,
    ROOT,
    git_commit,
    machine_info,
    markdown_table,
    write_json,
    write_markdown,
)

from rayops.paired import Better, paired_difference

ROWS = ROOT / "outputs" / "bench" / "rows"
Measure = Callable[[str, object, int], dict | None]


@dataclass(frozen=True)
class Sweep:
    """What a benchmark measures: named configs, the seeds each is measured on, and one measurement."""

    name: str  # results file stem: benchmarks/results/<name>.json
    configs: Mapping[str, object]  # config name -> whatever `measure` needs
    seeds: Sequence[int]
    measure: Measure  # (config name, config, seed) -> measured fields (JSON-serialisable), None: no row
    describe: str = ""  # one line for the JSON and the notes: what is measured and how
    extra: dict = field(default_factory=dict)  # benchmark-wide facts (sizes, bandwidth reference, ...)
    # the configs' order reversed on every other seed (A B, B A, ...): no config always runs first in a round
    alternate: bool = False
    # the configs' order rotated by one more on each seed (A B C, B C A, C A B, ...): each config leads a round
    rotate: bool = False


def parser(description: str, seeds: Sequence[int], quick_seeds: Sequence[int]) -> argparse.ArgumentParser:
    """The common CLI: --quick, --seeds, --fresh. Benchmarks add their own options to the parser returned."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="small sizes and seeds; writes under outputs/bench/quick/"
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help=f"default {list(seeds)} (quick {list(quick_seeds)})",
    )
    p.add_argument("--fresh", action="store_true", help="measure every row again (ignore the cached rows)")
    p.set_defaults(default_seeds=list(seeds), quick_seeds=list(quick_seeds))
    return p


def chosen_seeds(args: argparse.Namespace) -> list[int]:
    """The seeds of this run: --seeds, else the quick or full default."""
    return list(args.seeds) if args.seeds else list(args.quick_seeds if args.quick else args.default_seeds)


def results_dir(args: argparse.Namespace) -> Path:
    """benchmarks/results/, or outputs/bench/quick/ for --quick."""
    return QUICK_RESULTS if args.quick else RESULTS


def run_record(args: argparse.Namespace | None = None, **extra) -> dict:
    """The machine, the commit, the command line and the time: what every result JSON starts with."""
    return {
        "machine": machine_info(**extra),
        "code": {"commit": git_commit()},
        "argv": sys.argv,
        "quick": bool(getattr(args, "quick", False)),
        "started_unix": time.time(),
    }


def _rows_path(sweep: Sweep, out: Path) -> Path:
    """The row cache of a sweep: outputs/bench/rows/ (git-ignored), apart for quick and full runs."""
    return ROWS / ("quick" if out == QUICK_RESULTS else "full") / f"{sweep.name}.rows.jsonl"


def config_key(config: object) -> str:
    """A digest of what a config holds (functions and other objects by their name), stored with each row: a row
    measured with another value of the config is never taken for this one's."""
    text = json.dumps(
        config, sort_keys=True, default=lambda o: getattr(o, "__qualname__", type(o).__qualname__)
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_rows(sweep: Sweep, out: Path) -> dict[tuple[str, int], dict]:
    """Rows already measured for this sweep's configs and seeds, with the same config value (a torn last line is
    ignored, and so is a row measured with another value of its config, or before rows carried their key)."""
    path = _rows_path(sweep, out)
    rows: dict[tuple[str, int], dict] = {}
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        name = row.get("config")
        if (
            name in sweep.configs
            and row.get("seed") in sweep.seeds
            and row.get("config_key") == config_key(sweep.configs[name])
        ):
            rows[(name, row["seed"])] = row
    return rows


def saved_rows(sweep: Sweep, out: Path) -> dict[tuple[str, int], dict]:
    """The rows of the last written `<name>.json` under `out` that are this sweep's configs and seeds, with the
    same config value: what a report-only run tabulates again from a clean checkout (the row cache is local)."""
    path = out / f"{sweep.name}.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text()).get("rows", [])
    return {
        (row["config"], row["seed"]): row
        for row in rows
        if row.get("config") in sweep.configs
        and row.get("seed") in sweep.seeds
        and row.get("config_key") == config_key(sweep.configs[row["config"]])
    }


def measured_rows(sweep: Sweep, out: Path) -> list[dict]:
    """Every row of the sweep already measured, measuring nothing: from the row cache, else from the rows of the
    written `<name>.json` (`saved_rows`; they go back into the cache). The rows of a report-only run."""
    saved = saved_rows(sweep, out)

    def stored(name: str, config: object, seed: int) -> dict | None:
        row = saved.get((name, seed))
        return (
            None
            if row is None
            else {k: v for k, v in row.items() if k not in ("config", "config_key", "seed")}
        )

    return run_sweep(replace(sweep, measure=stored), out, progress=lambda _: None)


def run_sweep(
    sweep: Sweep, out: Path, fresh: bool = False, progress: Callable[[str], None] = print
) -> list[dict]:
    """Measure every (config, seed) not yet cached, seed-major; returns all rows in the order measured.

    Each row is `{"config", "seed", "seconds_measuring", **measure(...)}`, appended to the rows file as soon as
    it is measured; a measure that returns None leaves its row out (nothing is cached for it)."""
    path = _rows_path(sweep, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fresh and path.exists():
        path.unlink()
    done = cached_rows(sweep, out)
    total, rows = len(sweep.configs) * len(sweep.seeds), []
    for index, seed in enumerate(sweep.seeds):
        order = list(sweep.configs.items())
        if sweep.rotate:
            k = index % len(order)
            order = order[k:] + order[:k]
        for name, config in order[::-1] if sweep.alternate and index % 2 else order:
            row = done.get((name, seed))
            if row is None:
                start = time.perf_counter()
                measured = sweep.measure(name, config, seed)
                if measured is None:  # the benchmark leaves this row out (e.g. only tabulating what exists)
                    progress(f"[{sweep.name}] config={name} seed={seed}: left out")
                    continue
                row = {
                    "config": name,
                    "config_key": config_key(config),
                    "seed": seed,
                    "seconds_measuring": time.perf_counter() - start,
                    **measured,
                }
                with path.open("a") as handle:
                    handle.write(json.dumps(row, default=str) + "\n")
            rows.append(row)
            progress(f"[{sweep.name}] {len(rows)}/{total} config={name} seed={seed}")
    return rows


def paired_table(
    rows: Sequence[dict], metric: str, baseline: str, better: Better, configs: Sequence[str] | None = None
) -> dict:
    """Each config's `metric` minus the baseline's, paired over the seeds both have: mean, 95% interval and
    verdict (win / tie / loss on the `better` side)."""
    by_config: dict[str, dict[int, float]] = {}
    for row in rows:
        by_config.setdefault(row["config"], {})[row["seed"]] = float(row[metric])
    if baseline not in by_config:
        raise ValueError(f"baseline config {baseline!r} has no rows; configs measured: {sorted(by_config)}")
    entries = []
    for name in configs or [c for c in by_config if c != baseline]:
        seeds = sorted(set(by_config[name]) & set(by_config[baseline]))
        a = [by_config[name][s] for s in seeds]
        b = [by_config[baseline][s] for s in seeds]
        diff = paired_difference(a, b)
        entries.append(
            {
                "config": name,
                "mean": sum(a) / len(a),
                "baseline_mean": sum(b) / len(b),
                "difference": diff.mean,
                "low": diff.low,
                "high": diff.high,
                "seeds": len(seeds),
                "verdict": diff.verdict(better),
            }
        )
    return {"metric": metric, "baseline": baseline, "better": better, "rows": entries}


def paired_markdown(table: dict, digits: int = 3) -> str:
    """A paired table as Markdown: config, its mean, the baseline's, difference [interval], verdict."""
    f = f"{{:.{digits}f}}"
    rows = [
        [
            e["config"],
            f.format(e["mean"]),
            f.format(e["baseline_mean"]),
            f"{e['difference']:+.{digits}f} [{e['low']:+.{digits}f}, {e['high']:+.{digits}f}]",
            e["seeds"],
            e["verdict"],
        ]
        for e in table["rows"]
    ]
    header = [
        "config",
        table["metric"],
        f"{table['baseline']}",
        "difference [95% interval]",
        "seeds",
        "verdict",
    ]
    return markdown_table(header, rows)


def print_rows(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """The rows as a plain text table on stdout (config, seed, then `columns`)."""
    header = ["config", "seed", *columns]
    cells = [
        [str(r.get(c, "")) if not isinstance(r.get(c), float) else f"{r[c]:.4g}" for c in header]
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def finish(
    sweep: Sweep,
    args: argparse.Namespace,
    record: dict,
    rows: Sequence[dict],
    paired: Sequence[dict] = (),
    notes: Sequence[str] = (),
    title: str | None = None,
    sections: Sequence[tuple[str, str | list[str]]] = (),
) -> Path:
    """Write `<name>.json` (record, sweep description, rows, paired tables) and, with paired tables, notes or
    `sections` (a benchmark's own tables, generated from the rows: (heading, Markdown or bullet list)),
    `<name>.md` generated from them; print the paired tables. Returns the JSON path."""
    out = results_dir(args)
    record = {**record, "finished_unix": time.time()}
    payload = {
        **record,
        "benchmark": sweep.name,
        "describe": sweep.describe,
        "seeds": list(sweep.seeds),
        "configs": {
            name: config if _jsonable(config) else repr(config) for name, config in sweep.configs.items()
        },
        **sweep.extra,
        "rows": list(rows),
        "paired": list(paired),
    }
    path = write_json(out / f"{sweep.name}.json", payload)
    own, sections = sections, []
    if sweep.describe:
        sections.append(("What is measured", sweep.describe))
    sections += list(own)
    for table in paired:
        heading = f"{table['metric']} against {table['baseline']} (paired over seeds, 95% interval)"
        sections.append((heading, paired_markdown(table)))
        print(heading)
        print(paired_markdown(table))
    if notes:
        sections.append(("Notes", list(notes)))
    code = record.get("code", {})
    sections.append(
        (
            "Run",
            f"commit {code.get('commit')}, {len(rows)} rows, `{' '.join(record.get('argv', []))}`",
        )
    )
    if paired or notes or own:
        write_markdown(out / f"{sweep.name}.md", title or sweep.name, sections)
    print(f"-> {path}")
    return path


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
