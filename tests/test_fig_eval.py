"""The evaluation figures of the benchmark suite (benchmarks/fig_eval.py) in quick mode: each is produced
with a finite value and the details that make it checkable. Targets are not asserted (timings on a
shared machine are not test material); what the figures compare must hold whatever the timing."""

from __future__ import annotations

import math
import os

import pytest

from benchmarks import fig_eval

# A benchmark smoke check (80 s: a Ray instance and every evaluation figure at its smallest): `make test-slow`.
pytestmark = pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="benchmark smoke check: set RUN_SLOW=1")


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)  # 2 actors + 1 CPU for Ray Data
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def figures(ray_instance):
    return {fn.__name__: fn(True) for fn in fig_eval.FIGURES}


def test_every_figure_is_produced_with_a_finite_value(figures):
    assert list(figures) == ["bpda_warm_vs_cold", "eval_ray_vs_inprocess", "two_vs_one_worker", "worker_rss_10x"]
    for name, fig in figures.items():
        assert fig["name"] == name and math.isfinite(fig["value"]) and fig["value"] > 0
        assert fig["target"][:1] in "≤≥" and fig["met"] in (True, False) and isinstance(fig["details"], dict)


def test_the_figures_compare_like_with_like(figures):
    bpda = figures["bpda_warm_vs_cold"]["details"]
    assert 0 <= bpda["accuracy_cold"] <= 1 and 0 <= bpda["accuracy_warm"] <= 1
    assert bpda["examples_differing"] <= bpda["examples"]
    assert figures["eval_ray_vs_inprocess"]["details"]["same_predictions"]  # Ray or not, the same rows
    rss = figures["worker_rss_10x"]["details"]
    assert rss["rows"][1] == 10 * rss["rows"][0] and min(rss["peak_rss_mib"]) > 0
