"""Suite-wide hooks: the reliability battery's one-line count (issue #12), and the longest files first.

A test joins the battery with `@pytest.mark.reliability(kind=...)`, kind one of KINDS; each collected
item (every parametrized case) counts once. After the run, `make test` prints one line such as

    reliability: 9 fault scenarios, 31 bad-input cases, 12 properties, 5 security checks — all passed

or names what failed or was skipped, so a regression in the battery is visible at a glance.
"""

from __future__ import annotations

import pytest

KINDS = {
    "fault": "fault scenarios",
    "bad_input": "bad-input cases",
    "property": "properties",
    "security": "security checks",
    "invariance": "invariance checks",
}
_KIND: dict[str, str] = {}  # nodeid -> kind, of the collected battery
_OUTCOME: dict[str, str] = {}  # nodeid -> passed / failed / skipped


def _kind_of(item) -> str | None:
    marker = item.get_closest_marker("reliability")
    if marker is None:
        return None
    kind = marker.kwargs.get("kind", marker.args[0] if marker.args else None)
    if kind not in KINDS:
        raise pytest.UsageError(
            f"{item.nodeid}: @pytest.mark.reliability(kind=...) takes one of {', '.join(KINDS)}, got {kind!r}"
        )
    return kind


# The files that take longest (minutes: a multi-node cluster, Ray Train, many Ray Data runs), run first: `make test`
# hands whole files to its two pytest-xdist workers in collection order (--no-loadscope-reorder), so a long file
# started last would leave one worker idle while the other finishes it.
LONGEST_FIRST = [
    "tests/cluster/test_local_cluster.py",
    "tests/jobs/test_train_ray.py",
    "tests/reliability/test_invariance.py",
    "tests/tuning/test_search.py",
    "tests/jobs/test_evaluate.py",
    "tests/core/test_attacks.py",
    "tests/jobs/test_run_folder.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {path: k for k, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
    for item in items:
        kind = _kind_of(item)
        if kind is not None:
            _KIND[item.nodeid] = kind
            # travels with the item's reports: under pytest-xdist the controller, which counts, collects nothing
            item.user_properties.append(("reliability", kind))


def pytest_runtest_logreport(report):
    kind = dict(report.user_properties).get("reliability")
    if kind is not None:
        _KIND[report.nodeid] = kind
    if report.nodeid not in _KIND:
        return
    if report.failed:
        _OUTCOME[report.nodeid] = "failed"  # a failure in setup, call or teardown
    elif report.skipped and _OUTCOME.get(report.nodeid) != "failed":
        _OUTCOME[report.nodeid] = "skipped"
    elif report.when == "call" and report.passed and report.nodeid not in _OUTCOME:
        _OUTCOME[report.nodeid] = "passed"


def battery_line(kinds: dict[str, str], outcomes: dict[str, str]) -> str | None:
    """The summary line for the tests that ran (None when no battery test ran)."""
    ran = {node: kind for node, kind in kinds.items() if node in outcomes}
    if not ran:
        return None
    counts = [
        f"{sum(k == kind for k in ran.values())} {label}" for kind, label in KINDS.items() if kind in ran.values()
    ]
    failed = sorted(n for n in ran if outcomes[n] == "failed")
    skipped = sum(outcomes[n] == "skipped" for n in ran)
    if failed:
        verdict = f"{len(failed)} FAILED ({', '.join(failed[:5])}{', ...' if len(failed) > 5 else ''})"
    elif skipped:
        verdict = f"{len(ran) - skipped} passed, {skipped} skipped"
    else:
        verdict = "all passed"
    return f"reliability: {', '.join(counts)} — {verdict}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    line = battery_line(_KIND, _OUTCOME)
    if line is not None:
        terminalreporter.write_line(line, bold=True, red="FAILED" in line, green="all passed" in line)
