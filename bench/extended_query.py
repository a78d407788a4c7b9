"""Extended query attributes: write-path cost, backfill rate, cohort query latency.

Figures, not assertions (DESIGN.md §6). Builds an index of synthetic CT series
(Manufacturer, SliceThickness and ConvolutionKernel varying by series) directly
through the Index port, on SQLite and/or PostgreSQL, and prints:

- indexing rate without and with three extended attributes (the write-path cost);
- backfill rate over the same instances indexed without them;
- latency of the radiomics cohort query (three extended attributes + Modality),
  and for reference a query of the same selectivity on index columns only.

    .venv/bin/python -m bench.extended_query [--series 400] [--per-series 50]
        [--backend sqlite|postgresql|both] [--pg postgresql://postgres@127.0.0.1:5432]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text

from vna.adapters.index.extra import analyze
from vna.adapters.index.sqlalchemy import SqlIndex, ensure_database
from vna.dicom.extended import NO_EXTENDED, ExtendedAttributes, parse_extended_attributes
from vna.dicom.header import extract_record
from vna.dicom.matching import Level, build_query
from vna.ports import IndexRecord
from vna.testing.synthetic import ct_instance
from vna.usecases.backfill import backfill_extended

EXTENDED = parse_extended_attributes("Manufacturer,SliceThickness,ConvolutionKernel")
VENDORS = ["SIEMENS", "GE MEDICAL SYSTEMS", "PHILIPS", "CANON"]
THICKNESS = ["0.625", "1.0", "1.5", "2", "3", "5"]
KERNELS = ["B30f", "B70f", "FC13", "STANDARD"]
COHORT = {"Modality": "CT", "SliceThickness": "1.0", "ConvolutionKernel": "B30f",
          "Manufacturer": "SIEMENS"}


def series_attributes(n: int) -> dict[str, object]:
    vendor, thick, kernel = (VENDORS[n % 4], THICKNESS[(n // 4) % 6],
                             KERNELS[(n // 24) % 4])
    cohort = (vendor, thick, kernel) == ("SIEMENS", "1.0", "B30f")
    # Same selectivity on a column, for the reference query.
    return {"Manufacturer": vendor, "SliceThickness": thick, "ConvolutionKernel": kernel,
            "BodyPartExamined": "COHORT" if cohort else "CHEST"}


def records(series: int, per_series: int, extended: ExtendedAttributes) -> list[IndexRecord]:
    out = []
    study = generate_uid()
    for s in range(series):
        series_uid = generate_uid()
        if s % 20 == 0:
            study = generate_uid()
        attributes = series_attributes(s)
        for i in range(per_series):
            ds = ct_instance(study_uid=study, series_uid=series_uid, instance_number=i + 1,
                             rows=8, columns=8, series_number=s + 1, attributes=attributes)
            out.append(extract_record(ds, blob_key="b" * 64, size=1000,
                                      transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                                      extended=extended))
    return out


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def latency_ms(index: SqlIndex, keys: dict[str, str], runs: int = 30) -> tuple[float, int]:
    # Every query returns the three attributes, so that all of them read the
    # representative metadata alike and differ only in how they match.
    query = build_query(Level.SERIES, keys, extended=EXTENDED,
                        return_keys=["Manufacturer", "SliceThickness", "ConvolutionKernel"])
    found = len(index.search(query))
    samples = [timed(lambda: index.search(query)) for _ in range(runs)]
    return statistics.median(samples) * 1000, found


def fresh_url(backend: str, tmp: Path, pg: str) -> tuple[str, Callable[[], None]]:
    if backend == "sqlite":
        return f"sqlite:///{tmp / (uuid.uuid4().hex + '.sqlite')}", lambda: None
    name = f"vna_bench_ext_{uuid.uuid4().hex[:8]}"
    url = f"{pg.rstrip('/')}/{name}"
    ensure_database(url)

    def drop() -> None:
        admin = create_engine(f"{pg.rstrip('/')}/postgres".replace(
            "postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
    return url, drop


def run(backend: str, series: int, per_series: int, pg: str) -> None:
    n = series * per_series
    print(f"\n== {backend}: {series} series x {per_series} instances = {n} instances")
    plain = records(series, per_series, NO_EXTENDED)
    with_values = records(series, per_series, EXTENDED)
    with tempfile.TemporaryDirectory() as tmp:
        url_a, drop_a = fresh_url(backend, Path(tmp), pg)
        url_b, drop_b = fresh_url(backend, Path(tmp), pg)
        a, b = SqlIndex.from_url(url_a), SqlIndex.from_url(url_b)
        try:
            t_plain = timed(lambda: [a.upsert_instance(r) for r in plain])
            t_ext = timed(lambda: [b.upsert_instance(r) for r in with_values])
            print(f"index, no extended attributes:    {n / t_plain:8.0f} instances/s "
                  f"({t_plain / n * 1000:.2f} ms each)")
            print(f"index, 3 extended attributes:     {n / t_ext:8.0f} instances/s "
                  f"({t_ext / n * 1000:.2f} ms each, {(t_ext / t_plain - 1) * 100:+.0f}%)")
            t_backfill = timed(lambda: backfill_extended(EXTENDED, index=a))
            print(f"backfill of 3 attributes:         {n / t_backfill:8.0f} instances/s "
                  f"({t_backfill:.1f} s in all)")
            for idx in (a, b):  # the statistics autovacuum (PostgreSQL) would gather
                with idx.engine.begin() as conn:
                    analyze(conn)
            for label, idx in (("indexed with values", b), ("backfilled", a)):
                ms, found = latency_ms(idx, COHORT)
                print(f"cohort query ({label}): {ms:7.2f} ms median, {found} series")
            ms, found = latency_ms(b, {"Modality": "CT", "BodyPartExamined": "COHORT"})
            print(f"reference, same selectivity on columns: {ms:7.2f} ms median, "
                  f"{found} series")
            ms, found = latency_ms(b, {"Modality": "CT", "SliceThickness": "0.5-1.2",
                                       "Manufacturer": "SIEMENS"})
            print(f"numeric range + vendor:             {ms:7.2f} ms median, {found} series")
        finally:
            a.close()
            b.close()
            drop_a()
            drop_b()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--series", type=int, default=400)
    parser.add_argument("--per-series", type=int, default=50)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    for backend in (["sqlite", "postgresql"] if args.backend == "both" else [args.backend]):
        run(backend, args.series, args.per_series, args.pg)


if __name__ == "__main__":
    main()
