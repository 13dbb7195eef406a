"""The shared runner's folder rules, without Ray: one writer per run folder."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jobs.config import load_config
from jobs.runner import prepare_run_dir

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


def test_a_second_process_writing_the_same_run_folder_is_refused(tmp_path):
    cfg = load_config(SMOKE)
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(SMOKE.parents[1])!r})
        from pathlib import Path
        from jobs.config import load_config
        from jobs.runner import prepare_run_dir
        prepare_run_dir(load_config({str(SMOKE)!r}), Path({str(run_dir)!r}))
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"is being written by pid {holder.pid} .*choose another --out"):
            prepare_run_dir(cfg, run_dir)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    prepare_run_dir(cfg, run_dir)  # the lock died with its process
    prepare_run_dir(cfg, run_dir)  # and this process may prepare its own folder again
