"""A synthetic N-times year for the growth benchmark: real flights replicated with distinct keys
and jittered values, written as a landing zone the platform ingests like the real one.

    python benchmarks/synthetic.py --from LANDING --to LANDING [--factor 10] [--seed 0]

Copy 0 of every day is the real file. Copy k (1..N-1) of a flight has flight number
``(flight - 1 + 1000 k) mod 9999 + 1`` (moved on by further steps where that would repeat a key
of the day), and jittered delays: ``dep_delay`` and ``arr_delay`` plus the same normal noise
(sd 10 min, rounded, kept in the contract's range), ``air_time`` plus noise (sd 3 min). Cancelled
and diverted flights stay so. Weather and the reference snapshots are copied as they are: the
airports and hours do not multiply, the traffic does.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

KEY = ["year", "month", "day", "carrier", "flight", "origin", "sched_dep_time"]


def multiply_day(real: pd.DataFrame, factor: int, rng: np.random.Generator) -> pd.DataFrame:
    """``factor`` copies of one day's flights, keys distinct."""
    copies = [real]
    taken = set(map(tuple, real[KEY].itertuples(index=False)))
    for k in range(1, factor):
        copy = real.copy()
        flight = copy["flight"].to_numpy()
        new = np.empty_like(flight)
        for i, row in enumerate(copy[KEY].itertuples(index=False)):
            step = k
            while True:
                candidate = (int(row.flight) - 1 + 1000 * step) % 9999 + 1
                key = (row.year, row.month, row.day, row.carrier, candidate, row.origin, row.sched_dep_time)
                if key not in taken:
                    break
                step += factor  # the next offset no other copy uses
            taken.add(key)
            new[i] = candidate
        copy["flight"] = new
        noise = np.round(rng.normal(0, 10, len(copy)))
        for column in ("dep_delay", "arr_delay"):
            copy[column] = (copy[column] + noise).clip(-720, 2880)
        copy["air_time"] = (copy["air_time"] + np.round(rng.normal(0, 3, len(copy)))).clip(1, 1440)
        copies.append(copy)
    return pd.concat(copies, ignore_index=True)


def generate(source: Path, target: Path, factor: int = 10, seed: int = 0) -> int:
    """Write the N-times landing zone; returns the number of flights written."""
    rng = np.random.default_rng(seed)
    target.mkdir(parents=True, exist_ok=True)
    for folder in ("weather", "reference"):
        if (source / folder).exists():
            shutil.copytree(source / folder, target / folder, dirs_exist_ok=True)
    (target / "flights").mkdir(exist_ok=True)
    written = 0
    for path in sorted((source / "flights").glob("*.csv")):
        real = pd.read_csv(path, keep_default_na=False, na_values=["NA", ""], dtype={"tailnum": str})
        out = multiply_day(real, factor, rng)
        for column in ("dep_time", "arr_time", "flight", "sched_dep_time", "sched_arr_time"):
            out[column] = out[column].astype("Int64")
        tmp = target / "flights" / f".{path.name}.tmp"
        out.to_csv(tmp, index=False, na_rep="NA")
        tmp.replace(target / "flights" / path.name)
        written += len(out)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, required=True, help="a replayed landing zone")
    parser.add_argument("--to", dest="target", type=Path, required=True)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{generate(args.source, args.target, args.factor, args.seed):,} flights written to {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
