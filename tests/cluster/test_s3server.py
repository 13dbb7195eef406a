"""The SeaweedFS test helper (tests/s3server.py): a real S3 server that Parquet round-trips through, reachable
from plain `s3://` URIs with only its env() set, and gone (port closed, process reaped) once stopped."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.s3server import listening, s3_server


def test_parquet_round_trip_through_seaweedfs_then_stop(tmp_path, monkeypatch):
    table = pa.table({"step": [1, 2, 3], "loss": [0.5, 0.25, 0.125]})
    with s3_server(tmp_path / "s3") as s3:
        fs = s3.filesystem()
        pq.write_table(table, f"{s3.bucket}/runs/r1/metrics.parquet", filesystem=fs)
        listed = fs.get_file_info(pafs.FileSelector(f"{s3.bucket}/runs", recursive=True))
        assert f"{s3.bucket}/runs/r1/metrics.parquet" in {info.path for info in listed if info.is_file}
        assert pq.read_table(f"{s3.bucket}/runs/r1/metrics.parquet", filesystem=fs).equals(table)

        # no endpoint in code: pyarrow takes it (and the http scheme) from AWS_ENDPOINT_URL
        for name, value in s3.env().items():
            monkeypatch.setenv(name, value)
        assert pq.read_table(s3.uri("runs/r1/metrics.parquet")).equals(table)
        pq.write_table(table, s3.uri("runs/r2/metrics.parquet"))
        assert pq.read_table(f"{s3.bucket}/runs/r2/metrics.parquet", filesystem=fs).equals(table)
        pid, port = s3.pid, s3.port

    assert pid is not None and not listening(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
