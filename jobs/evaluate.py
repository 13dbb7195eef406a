"""`invgan eval`: every attack against every defense, sharded over Ray Data, recorded in MLflow.

    config ─▶ run folder runs/<name>-<hash> ─▶ shards of the test set ─▶ ray.data map_batches(EvalWorker)
          ─▶ one Parquet file of rows per shard (atomic; a rerun skips finished shards)
          ─▶ driver: summary.json, tables, figures ─▶ MLflow (only the driver logs)

A shard is `shard_size` consecutive examples of the (limited) split. Every example's randomness
comes from (seed, example id), so the rows do not depend on the number of workers or shard order.
The shards run through the shared runner (jobs/sharded.py); on a cluster the same command runs as a
Ray job (`invgan submit -- eval ...`).
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from invgan_core.checkpoint import load_model, read_manifest, save_model
from invgan_core.data import load_dataset
from invgan_core.detection import detection_scores
from invgan_core.inversion import busy_clock, run_fused
from invgan_core.models import build_model, default_arch
from jobs import masking, precision, run_tables
from jobs.config import BLACK_BOXES, EvalConfig, MaskingChecks, examples_in_shard, load_config
from jobs.models import build_defense, check_job_inputs, load_models, worker_device
from jobs.paper_spec import tables_fed_by
from jobs.precision import expected_round_rows as expected_round_rows
from jobs.precision import new_positions
from jobs.ray_session import quiet_ray_logging
from jobs.schemas import EVAL_ROWS
from jobs.sharded import JobOptions, JobResult, ShardedJob, job_main, run_folder, run_sharded_job
from jobs.tracking import log_dataset

# A projection whose latent coordinate passes this (prior scale 1) has run away from every image G was trained to
# make, though float32 still holds it: a step size that blows up the projection. Its row is flagged `diverged`.
DIVERGED_LATENT = 100.0


# ---------------------------------------------------------------- the worker (one Ray actor)


class EvalWorker:
    """Loads the models once; per shard, runs every attack and defense and returns its rows."""

    def __init__(self, config: dict, run_dir: str | None = None, after: dict[str, int] | None = None):
        """`after`: a precision round (jobs/precision.py): no clean rows, and each attack only on the examples its
        limit in `config` adds to `after[attack]` (attacks not in `after` or not growing: none)."""
        self.cfg = EvalConfig.model_validate(config)
        self.after = after
        res = self.cfg.resources
        torch.set_num_threads(res.torch_threads or max(1, int(res.num_cpus_per_worker)))
        self.device = worker_device(res)
        self.models = load_models(self.cfg, self.device)
        self.data = load_dataset(self.cfg.dataset, self.cfg.split, self.cfg.data_dir).subset(self.cfg.limit)
        G, I, f = self.models["generator"], self.models.get("inverter"), self.models["classifier"]
        self.defenses = {name: build_defense(spec, G, I, f, self.cfg.seed) for name, spec in self.cfg.defenses.items()}
        self.attacks = {name: spec.build(self.cfg.seed) for name, spec in self.cfg.attacks.items()}
        self.substitutes = load_substitutes(self.cfg, Path(run_dir) if run_dir else None, self.device)
        with torch.no_grad():  # warm up torch's kernels so the first shard's seconds are not inflated
            f(G(G.sample_latent(2)))

    def run_shard(self, shard: int, start: int, stop: int) -> pd.DataFrame:
        """Every (attack, target) of the shard and every defense's clean rows, as tasks whose projections through
        G go as one batch per step (`run_fused`; `resources.fused: false` runs them one after the other)."""
        x = self.data.images[start:stop].to(self.device)
        y = self.data.labels[start:stop].to(self.device)
        ids = torch.as_tensor(self.data.ids[start:stop], device=self.device)
        tasks = [  # clean inputs
            partial(self._rows, shard, "clean", name, defense, x, y, ids, None, 0.0)
            for name, defense in self.defenses.items()
            if self.after is None
        ]
        for name in self.attacks:
            spec = self.cfg.attacks[name]
            at = examples_in_shard(spec, start, stop, len(self.data))  # spread over the split (attack `limit`)
            if self.after is not None:  # a precision round: only the examples this round adds
                at = new_positions(
                    self.cfg, name, self.after, _limits(self.cfg, self.after), (shard, start, stop), len(self.data)
                )
            if at:
                tasks += [
                    partial(self._attack_rows, shard, name, t, x[at], y[at], ids[at])
                    for t in attack_targets(self.cfg, name)
                ]
        frames = run_fused(self.models["generator"], tasks, fused=self.cfg.resources.fused)
        return pd.concat(
            [f for frame in frames for f in (frame if isinstance(frame, list) else [frame])], ignore_index=True
        )

    def _attack_rows(self, shard, name, t, xs, ys, ids_s) -> list[pd.DataFrame]:
        """Attack `name` against target `t` ('classifier' or a defense) and the rows it feeds. `each`: end to end
        against each defense, rows for that defense only; otherwise computed once against the classifier or one
        defense and fed to every defense. A black box attacks through its substitute trained on that target's
        labels (on the driver, before the shards)."""
        spec = self.cfg.attacks[name]
        target = self.models["classifier"] if t == "classifier" else self.defenses[t]
        result, secs = _attack(self.substitutes.get((name, t), self.attacks[name]), target, xs, ys, ids_s)
        return [
            self._rows(shard, name, dname, self.defenses[dname], xs, ys, ids_s, result, secs, reuse=dname == t)
            for dname in ([t] if spec.target == "each" else list(self.defenses))
        ]

    def _rows(
        self, shard, attack_name, defense_name, defense, x, y, ids, result, attack_secs, *, reuse: bool = False
    ) -> pd.DataFrame:
        """`reuse`: the defense is the attack's target, whose success check already purified x_adv (same
        defense, input and ids; a deterministic projection): take that result instead of projecting again.
        Its seconds are the row's `seconds` (and not in `attack_seconds`: see `_attack`)."""
        x_in = x if result is None else result.x_adv
        if reuse and result is not None and result.purified is not None:
            purified, secs = result.purified, result.purify_seconds
        else:
            purified, secs = _timed(lambda: defense.purify(x_in, ids))
        with torch.no_grad():
            logits = self.models["classifier"](purified.x)
        pred, diverged = logits.argmax(1).cpu(), diverged_rows(x_in, purified, logits).cpu()
        if purified.z is None:
            scores = torch.full((len(x),), float("nan"))  # CPU: row values, as the .cpu() ones beside
        else:
            scores = detection_scores(self.models["classifier"], x_in, purified.x, self.cfg.detection_space).cpu()
        n, none = len(x), torch.zeros(len(x))  # CPU: row values
        return EVAL_ROWS.frame(
            n,
            example_id=ids.cpu().numpy(),
            label=y.cpu().numpy(),
            attack=attack_name,
            defense=defense_name,
            prediction=pred.numpy(),
            correct=(pred == y.cpu()).numpy(),
            detection_score=scores.numpy(),
            l2=(result.l2.cpu() if result is not None else none).numpy(),
            linf=(result.linf.cpu() if result is not None else none).numpy(),
            # restart-steps spent on each example (they differ with Defense-GAN's pruning or early stopping)
            effective_iterations=(
                purified.iterations.cpu().round().long().numpy()
                if purified.iterations is not None
                else round(purified.effective_iterations)
            ),
            seconds=secs / n,
            attack_seconds=attack_secs / n,
            attacked=result is not None,
            queries=result.queries.cpu().numpy() if result is not None else 0,
            shard=shard,
            diverged=diverged.numpy(),
        )


def diverged_rows(x_in, purified, logits):
    """(N,) bool: the attack or the projection blew up (NaN or ±∞ in the attacked input, the projection, its
    latent or the logits, or a latent beyond DIVERGED_LATENT). Such rows are counted, never scored."""

    def nonfinite(t):
        return ~torch.isfinite(t.flatten(1)).all(1)

    bad = nonfinite(x_in) | nonfinite(purified.x) | nonfinite(logits)
    if purified.z is not None:
        bad |= nonfinite(purified.z) | (purified.z.flatten(1).abs().amax(1) > DIVERGED_LATENT)
    return bad


def _attack(attack, target, x, y, ids):
    """The attack's result and seconds, less the seconds of the target's purification in its success check:
    the target's row reports that purification as its `seconds`, so attack_seconds + seconds count it once."""
    result, secs = _timed(lambda: attack(target, x, y, ids=ids))
    return result, secs - result.purify_seconds


def _timed(fn):
    """fn's result and seconds (`busy_clock`: inside a fused shard, this task's own share of the work)."""
    t = busy_clock()
    out = fn()
    return out, busy_clock() - t


# ---------------------------------------------------------------- black boxes, trained once on the driver

SUBSTITUTES = "substitutes"  # the run folder's subfolder of trained substitutes: <attack>-<oracle>.{safetensors,json}


def attack_targets(cfg: EvalConfig, name: str) -> list[str]:
    """What attack `name` attacks: 'classifier', one defense, or every defense (`each`); a black box trains its
    substitute on the labels of each."""
    target = cfg.attacks[name].target
    return list(cfg.defenses) if target == "each" else [target]


def substitute_seeds(cfg: EvalConfig, full, n: int) -> dict[str, slice]:
    """Each substitute attack's seed set: the split's last `seeds` images (the split is class-interleaved, so
    any stretch of it is stratified), which must not be among the n evaluated ones (the first n).
    ValueError naming the attack and the fix, before any work."""
    out = {}
    for name, spec in cfg.attacks.items():
        if spec.kind in BLACK_BOXES:
            k = spec.build(cfg.seed).seeds
            if n + k > len(full):
                raise ValueError(
                    f"attacks.{name}: the substitute's {k} seed images are the split's last {k}, which must not "
                    f"be evaluated; the split has {len(full)} images and {n} are evaluated: set limit <= "
                    f"{len(full) - k} or fewer seeds (attacks.{name}.params.seeds)"
                )
            out[name] = slice(len(full) - k, len(full))
    return out


def prepare_substitutes(
    cfg: EvalConfig, models: dict, full, seeds: dict[str, slice], run_dir: Path, device="cpu"
) -> None:
    """Train every substitute attack against each of its oracles, once per run (saved in the run folder and
    reused by every shard and every resume): Papernot et al.'s protocol, on the labels of the oracle, from the
    seed images `substitute_seeds` chose."""
    G, I, f = models["generator"], models.get("inverter"), models["classifier"]
    shape = tuple(read_manifest(cfg.weights_dir() / "classifier")["arch"]["image_shape"])
    for name, where in seeds.items():
        for oracle in attack_targets(cfg, name):
            stem = run_dir / SUBSTITUTES / f"{name}-{oracle}"
            if stem.with_suffix(".json").exists():
                continue
            attack = cfg.attacks[name].build(cfg.seed)
            torch.manual_seed(cfg.seed)
            arch = default_arch("classifier", shape)  # the target's architecture family, fresh weights
            attack.substitute = build_model("classifier", arch)
            attack.seed_images = full.images[where].to(device)
            target = f if oracle == "classifier" else build_defense(cfg.defenses[oracle], G, I, f, cfg.seed)
            print(
                f"training the substitute of {name} on the labels of {oracle} "
                f"({attack.oracle_queries()} oracle queries) ...",
                file=sys.stderr,
                flush=True,
            )
            started = time.perf_counter()
            sub = attack.train(target, device)
            save_model(
                stem,
                sub,
                kind="classifier",
                arch=arch,
                oracle=oracle,
                oracle_queries=attack.queries_spent,
                seed_ids=[int(full.ids[where.start]), int(full.ids[where.stop - 1])],
                seconds=round(time.perf_counter() - started, 1),
            )


def load_substitutes(cfg: EvalConfig, run_dir: Path | None, device) -> dict:
    """{(attack, oracle): the attack bound to its substitute trained on that oracle's labels} from the run folder,
    hash-verified."""
    out = {}
    for name, spec in cfg.attacks.items():
        if spec.kind not in BLACK_BOXES:
            continue
        if run_dir is None:
            raise ValueError(f"attacks.{name}: a substitute attack needs the run folder its substitute is trained in")
        for oracle in attack_targets(cfg, name):
            model, manifest = load_model(
                run_dir / SUBSTITUTES / f"{name}-{oracle}", kind="classifier", map_location=device
            )
            out[(name, oracle)] = spec.build(cfg.seed).bind(
                model.requires_grad_(False), int(manifest["oracle_queries"])
            )
    return out


# ---------------------------------------------------------------- the driver


def expected_rows(cfg: EvalConfig, start: int, stop: int, n: int) -> int:
    """Rows a complete shard holds (of a split of n examples): clean x defenses, plus each attack's examples in
    the shard x defenses it covers."""
    return len(cfg.defenses) * (
        (stop - start) + sum(len(examples_in_shard(s, start, stop, n)) for s in cfg.attacks.values())
    )


def _limits(cfg: EvalConfig, after: dict[str, int]) -> dict[str, int]:
    """Each attack of `after` at its limit in `cfg` (a round's config), as a count of examples."""
    return {a: cfg.attacks[a].limit or after[a] for a in after}


def eval_job(cfg: EvalConfig, run_dir: Path, *, kind: str = "eval", finish=None) -> ShardedJob:
    """The sharded job of an eval config, its inputs checked (weights, data, substitute seeds) before any work.
    `finish` replaces the eval summary (curves adds its own table to it)."""
    models = load_models(cfg)  # fail on a missing or altered weights file before any Ray work
    full = load_dataset(cfg.dataset, cfg.split, cfg.data_dir)
    data = full.subset(cfg.limit)
    check_job_inputs(cfg, data)  # models that agree and images they can score, before any Ray work
    n = len(data)
    seeds = substitute_seeds(cfg, full, n)  # seed images apart from the evaluated ones, checked before any work
    return ShardedJob(
        kind=kind,
        worker=EvalWorker,
        worker_kwargs={"config": cfg.model_dump(mode="json")},
        schema=EVAL_ROWS,
        n_examples=n,
        expected=lambda a, b: expected_rows(cfg, a, b, n),
        prepare=lambda run_dir: prepare_substitutes(cfg, models, full, seeds, run_dir),
        ships=(f"{SUBSTITUTES}/*",) if seeds else (),  # the trained substitutes, to every worker
        finish=finish or (lambda run_dir, rows, run, shards: finish_eval(cfg, run_dir, rows, run, models, shards)),
        on_start=lambda run: log_dataset(run, full, data),
        tags={"defenses": ",".join(cfg.defenses), "attacks": ",".join(cfg.attacks)},
        more=(lambda run_dir, rows: precision.more_shards(cfg, n, run_dir, rows)) if cfg.precision else None,
    )


def evaluate(cfg: EvalConfig, opts: JobOptions | None = None) -> JobResult:
    """Run (or resume) the evaluation described by `cfg`; returns the rows and their summary."""
    opts = opts or JobOptions()
    quiet_ray_logging(opts.verbose)
    return run_sharded_job(cfg, eval_job(cfg, run_folder(cfg, opts.out)), opts)


def finish_eval(cfg: EvalConfig, run_dir: Path, rows: pd.DataFrame, tracker, models: dict, shards_info: dict) -> dict:
    """Summary, figures and the MLflow records, all derived from the rows."""
    headline = rows[~rows["attack"].map(masking.is_check)]  # check/ attacks only feed the masking flags
    summary = run_tables.summarize(headline)
    flags = masking_flags(cfg, rows)
    summary["masking"] = masking.flags_summary(flags)
    if cfg.precision is not None:
        summary["precision"] = precision.status(
            cfg, int((rows["attack"] == "clean").sum() / len(cfg.defenses)), rows, run_dir
        )
    if tracker is not None:
        figures = {"roc": run_tables.roc_figure(headline), "images": example_grid(cfg, models)}
        run_tables.log_results(
            tracker.client,
            tracker.run_id,
            summary=summary,
            rows_dir=run_dir / "rows",
            run_name=f"{cfg.name}-{cfg.config_hash()[:8]}",
            figures=figures,
            feeds=tables_fed_by(cfg.name),
            tags={
                "shards_retried": shards_info["retried"],
                "nodes": rows["node"].nunique() if "node" in rows else 0,
                "masking_flags": len(summary["masking"]["flagged"]),
            },
        )
        tracker.client.log_text(tracker.run_id, masking.flags_markdown(flags), "masking.md")
    return summary


def masking_text(masking: dict | None) -> str:
    """The masking flags of a summary as printed after the tables."""
    if not masking or not masking["checks"]:
        return "Gradient-masking checks: none applied (add comparable attacks or masking_checks: to the config)"
    flagged = masking["flagged"]
    lines = [
        f"Gradient-masking checks: {masking['checks']} run, {len(flagged)} flagged"
        + (" (see jobs/masking.py for what each means)" if flagged else "")
    ]
    lines += [
        f"  FLAG {f['defense']}: {f['check']} — {f['attack']} {f['acc']:.2f} vs {f['compared_with']} "
        f"{f['acc_other']:.2f} (n={f['n']})"
        for f in flagged
    ]
    return "\n".join(lines)


def masking_flags(cfg: EvalConfig, rows: pd.DataFrame) -> pd.DataFrame:
    """The gradient-masking checks (jobs/masking.py) of this config's attacks over its rows."""
    m = cfg.masking_checks or MaskingChecks()
    specs = {name: spec.model_dump(mode="json", exclude_none=True) for name, spec in cfg.attacks.items()}
    kinds = {name: spec.kind for name, spec in cfg.defenses.items()}
    return masking.masking_flags(rows, specs, tol=m.tol, floor=m.floor, defense_kinds=kinds)


def example_grid(cfg: EvalConfig, models: dict, n: int = 6):
    """Clean / attacked / projected images of the first n examples (InvGAN Fig. 2), first attack vs classifier."""
    data = load_dataset(cfg.dataset, cfg.split, cfg.data_dir).subset(min(n, cfg.limit or n))
    x, y, ids = data.images, data.labels, torch.as_tensor(data.ids)  # CPU: the figure's images, on the driver
    name = next((k for k, s in cfg.attacks.items() if s.target == "classifier"), None)
    attacked = {name: cfg.attacks[name].build(cfg.seed)(models["classifier"], x, y, ids=ids).x_adv} if name else {}
    x_in = attacked[name] if name else x
    projected = {}
    for dname, spec in cfg.defenses.items():
        if spec.kind != "none":
            d = build_defense(spec, models["generator"], models.get("inverter"), models["classifier"], cfg.seed)
            projected[dname] = d.purify(x_in, ids).x.numpy()
    return run_tables.image_grid(x.numpy(), {k: v.numpy() for k, v in attacked.items()}, projected, labels=y.numpy())


def show(cfg: EvalConfig, res: JobResult) -> None:
    """The tables `invgan eval` prints: accuracy, detection AUC, the masking flags."""
    print(f"\nAccuracy ({cfg.dataset}, n per cell in brackets)\n" + run_tables.markdown_table(res.summary, "accuracy"))
    if res.summary.get("auc"):
        print("\nDetection ROC AUC, clean vs attacked\n" + run_tables.markdown_table(res.summary, "auc"))
    print("\n" + masking_text(res.summary.get("masking")))
    if res.summary.get("precision"):
        print("\n" + precision.status_text(res.summary["precision"]))


def main(config: Path, overrides: list[str], opts: JobOptions, *, limit: int | None = None) -> JobResult:
    """The `invgan eval` command: validate, run or resume, print the tables and where results are."""
    return job_main("evaluation", lambda: load_config(config, overrides, limit=limit), evaluate, show, opts)
