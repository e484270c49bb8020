"""Strict reading of landing files: every malformed file is rejected whole, with file, line and
column in the message."""

from __future__ import annotations

import pandas as pd
import pytest

from mlplatform.ingest.contracts import FLIGHTS, WEATHER
from mlplatform.ingest.parse import LandingFileError, read_landing_file

LANE = "unit"

HEADER = ",".join(FLIGHTS.columns)
ROW = "2013,1,1,517,515,2.0,830,819,11.0,UA,1545,N14228,EWR,IAH,227.0,1400,5,15,2013-01-01T10:00:00Z"
ROW2 = "2013,1,1,533,529,4.0,850,830,20.0,UA,1714,N24211,LGA,IAH,227.0,1416,5,29,2013-01-01T10:00:00Z"


def write(tmp_path, content: bytes | str, name="2013-01-01.csv"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def rejected(tmp_path, content, contract=FLIGHTS) -> LandingFileError:
    path = write(tmp_path, content)
    with pytest.raises(LandingFileError) as info:
        read_landing_file(path, contract)
    assert str(path) in str(info.value)
    return info.value


def test_valid_file_is_typed(tmp_path):
    frame = read_landing_file(write(tmp_path, f"{HEADER}\n{ROW}\n{ROW2}\n"), FLIGHTS)
    assert len(frame) == 2
    assert frame["dep_time"].tolist() == [517, 533]
    assert str(frame["flight"].dtype) in {"int64", "Int64"}
    assert frame["time_hour"].iloc[0] == pd.Timestamp("2013-01-01 10:00:00")
    assert frame["_source_row"].tolist() == [2, 3]


def test_na_and_empty_fields_are_null_and_columns_may_be_reordered(tmp_path):
    columns = list(FLIGHTS.columns)[::-1]
    values = dict(zip(FLIGHTS.columns, ROW.split(",")))
    values["dep_time"], values["tailnum"] = "NA", ""
    frame = read_landing_file(
        write(tmp_path, ",".join(columns) + "\n" + ",".join(values[c] for c in columns) + "\n"), FLIGHTS
    )
    assert pd.isna(frame["dep_time"].iloc[0]) and frame["tailnum"].iloc[0] is None
    assert frame["carrier"].iloc[0] == "UA"


def test_timestamps_with_offsets_are_converted_to_utc(tmp_path):
    row = ROW.replace("2013-01-01T10:00:00Z", "2013-01-01T05:00:00-05:00")
    frame = read_landing_file(write(tmp_path, f"{HEADER}\n{row}\n"), FLIGHTS)
    assert frame["time_hour"].iloc[0] == pd.Timestamp("2013-01-01 10:00:00")


def test_header_only_file_has_no_rows(tmp_path):
    assert len(read_landing_file(write(tmp_path, HEADER + "\n"), FLIGHTS)) == 0


def test_empty_file(tmp_path):
    error = rejected(tmp_path, b"")
    assert error.line == 1 and "empty" in error.message


def test_wrong_columns(tmp_path):
    error = rejected(tmp_path, HEADER.replace("dep_delay", "depdelay") + f"\n{ROW}\n")
    assert error.line == 1 and error.column == "dep_delay"
    assert "missing column(s) dep_delay" in error.message and "unexpected column(s) depdelay" in error.message


def test_duplicate_column(tmp_path):
    error = rejected(tmp_path, HEADER + ",carrier\n" + ROW + ",UA\n")
    assert error.column == "carrier" and "duplicate" in error.message


def test_text_in_numeric_column_names_line_and_column(tmp_path):
    error = rejected(tmp_path, f"{HEADER}\n{ROW}\n{ROW2.replace(',533,', ',abc,')}\n")
    assert (error.line, error.column) == (3, "dep_time")
    assert "'abc' is not a whole number" in error.message


def test_fraction_in_integer_column(tmp_path):
    error = rejected(tmp_path, f"{HEADER}\n{ROW.replace(',1545,', ',1545.5,')}\n")
    assert (error.line, error.column) == (2, "flight")


def test_whole_number_out_of_range_names_the_value(tmp_path):
    error = rejected(tmp_path, f"{HEADER}\n{ROW.replace(',1545,', ',1e20,')}\n")
    assert (error.line, error.column) == (2, "flight")


def test_non_finite_numbers_are_rejected(tmp_path):
    error = rejected(tmp_path, f"{HEADER}\n{ROW.replace(',227.0,', ',inf,')}\n")
    assert (error.line, error.column) == (2, "air_time") and "'inf' is not a number" in error.message


def test_bad_timestamp(tmp_path):
    error = rejected(tmp_path, f"{HEADER}\n{ROW.replace('2013-01-01T10:00:00Z', 'yesterday')}\n")
    assert (error.line, error.column) == (2, "time_hour")


def test_truncated_row(tmp_path):
    error = rejected(tmp_path, f"{HEADER}\n{ROW}\n{ROW2[:40]}\n")
    assert error.line == 3 and "expected 19 fields, found" in error.message
    fields_present = ROW2[:40].count(",") + 1
    assert error.column == list(FLIGHTS.columns)[fields_present]  # the first missing one


def test_truncated_last_line_without_terminator(tmp_path):
    # cut inside the last value: every field is there, but the file ends mid-line
    error = rejected(tmp_path, f"{HEADER}\n{ROW}\n{ROW2[:-3]}")
    assert error.line == 3 and "truncated" in error.message


def test_wrong_encoding_names_line_and_column(tmp_path):
    latin1 = f"{HEADER}\n{ROW}\n{ROW2.replace('N24211', 'N2421é')}\n".encode("latin-1")
    error = rejected(tmp_path, latin1)
    assert (error.line, error.column) == (3, "tailnum")
    assert "UTF-8" in error.message


def test_unterminated_quote(tmp_path):
    error = rejected(tmp_path, f'{HEADER}\n{ROW}\n"2013,1,1\n')
    assert error.line is not None and ("malformed" in error.message or "fields" in error.message)


def test_parquet_files_are_read_with_the_same_rules(tmp_path):
    frame = pd.DataFrame([dict(zip(WEATHER.columns, [
        "EWR", 2013, 1, 1, 1, 39.02, 26.06, 59.37, 270.0, 10.35702, None, 0.0, 1012.0, 10.0,
        pd.Timestamp("2013-01-01 06:00:00", tz="UTC")]))])
    path = tmp_path / "2013-01-01.parquet"
    frame.to_parquet(path)
    out = read_landing_file(path, WEATHER)
    assert out["origin"].tolist() == ["EWR"] and out["hour"].tolist() == [1]
    assert out["time_hour"].iloc[0] == pd.Timestamp("2013-01-01 06:00:00")
    frame.assign(temp="warm").to_parquet(path)
    with pytest.raises(LandingFileError) as info:
        read_landing_file(path, WEATHER)
    assert (info.value.line, info.value.column) == (1, "temp")


def test_corrupt_parquet(tmp_path):
    path = write(tmp_path, b"PAR1 not really", "2013-01-01.parquet")
    with pytest.raises(LandingFileError, match="unreadable Parquet"):
        read_landing_file(path, WEATHER)
