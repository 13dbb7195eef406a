"""A paper's protocol against our configs: the "Deviations" list of a docs/results.md section (issue #22).

configs/repro/paper_numbers.yaml states, per table, the paper's value of each setting the paper gives, by a
dotted path into the job config as it runs (defaults the config leaves out included) or into a weights
manifest:

    protocol:
      defenses.invgan.params.optimizer: {paper: sgd, source: "eq. 6: plain gradient descent"}
      weights.inverter.training.steps_done: {paper: 100000, source: "Sec. 4"}

`deviations` reads each setting from the table's configs (the first that has it) and returns one line per
setting where ours differs, so the list follows the configs instead of being typed beside them. A path that
names nothing in any of them is an error that names the path (a typo would otherwise read as "no deviation").
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

from invgan_core.checkpoint import read_manifest
from jobs.paper_spec import Setting
from jobs.specs import ATTACKS, BLACK_BOXES, DEFENSES, WRAPPERS

_REGISTRIES: dict[str, dict[str, Any]] = {
    "defenses": dict(DEFENSES),
    "attacks": {**ATTACKS, **WRAPPERS, **BLACK_BOXES},
    "dictionary": dict(ATTACKS),  # RED's attack dictionary: dictionary.attacks.<name>.params
}


def _defaults(kind: str, section: str) -> dict[str, Any]:
    cls = _REGISTRIES.get(section, {}).get(kind)
    if cls is None:
        return {}
    return {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


def resolve(config: dict, path: str, weights_dir: Path | None = None) -> Any:
    """The value at a dotted `path` of a config (as `model_dump(mode="json")`), a spec's `params` completed with
    its class's defaults; `weights.<model>.<key>...` reads the manifest of weights_dir/<model>. KeyError if the
    path names nothing."""
    parts = path.split(".")
    if parts[0] == "weights":
        if weights_dir is None or len(parts) < 3 or not (weights_dir / f"{parts[1]}.json").exists():
            raise KeyError(path)
        node: Any = read_manifest(weights_dir / parts[1])
        rest = parts[2:]
    else:
        node, rest = config, parts
    kind = None
    for key in rest:
        if not isinstance(node, dict):
            raise KeyError(path)
        if key == "params" and kind is not None:
            node = _defaults(kind, parts[0]) | (node.get("params") or {})
            kind = None
            continue
        if key not in node:
            raise KeyError(path)
        node = node[key]
        kind = node.get("kind") if isinstance(node, dict) else None
    return node


def same(ours: Any, paper: Any) -> bool:
    if isinstance(ours, (int, float)) and isinstance(paper, (int, float)) and not isinstance(ours, bool):
        return math.isclose(float(ours), float(paper), rel_tol=1e-9, abs_tol=1e-12)
    return bool(ours == paper)


def deviations(protocol: dict[str, Setting], configs: list[tuple[dict, Path | None]]) -> tuple[list[str], int]:
    """(one markdown line per setting where ours differs from the paper, settings compared); `configs`: each
    config's JSON and weights folder, searched in order. KeyError naming a path no config has."""
    lines = []
    for path, setting in protocol.items():
        for config, weights_dir in configs:
            try:
                ours = resolve(config, path, weights_dir)
                break
            except KeyError:
                continue
        else:
            raise KeyError(f"protocol: {path!r} names nothing in the table's configs or their weights manifests")
        if not same(ours, setting.paper):
            where = f" ({setting.source})" if setting.source else ""
            lines.append(f"- `{path}`: ours {_show(ours)}; the paper {_show(setting.paper)}{where}")
    return lines, len(protocol)


def _show(v: Any) -> str:
    return "unset" if v is None else f"**{v}**" if not isinstance(v, (dict, list)) else f"`{v}`"
