"""Figures of the projection (issue #9): FLOP/s against the machine's matmul, batching, Defense-GAN's cost.

Shipped mnist5k generator, classifier and inverter; mnist5k test images. Every figure is a ratio
measured in this process: baselines and candidates are interleaved and the medians of repeats used.

- projection_flops_vs_matmul: achieved FLOP/s of `project`'s loop (FLOPs of one step of the reference
  computation, forward + backward to z, counted by FlopCounterMode) ÷ a 2048² float32 matmul's FLOP/s, at 256
  rows; projection_flops_vs_matmul_batch16 the same at 16 rows (both from one measurement at 1, 4, 16, 64, 256
  and 640 rows: a first-success attack's late steps project a few survivors each).
- batched_vs_reference_loop: row-steps per second of `project` on examples x restarts in one batch
  ÷ a plain per-example loop (one example, one restart, torch.optim.Adam, batch 1 through G).
- projection_step_speedups: seconds per Adam step through each variant tried (channels-last, batch norm
  folded, torch.compile, the other thread count) ÷ through G itself; the value is the kept variant's.
- defensegan_pruned_cost: restart-steps of the cheapest pruned / early-stopped Defense-GAN whose clean
  and FGSM-transfer accuracy are both within 0.5 point of plain R x L ÷ R x L.
- invgan_iterations_to_defensegan: effective iterations of the smallest InvGAN T whose clean accuracy
  is within 0.5 point of Defense-GAN R x L ÷ R x L.
"""

from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from invgan_core.inversion import initial_latents, per_example_mse, project

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.005  # "within 0.5 point" of accuracy


@functools.cache
def models() -> dict:
    from invgan_core.checkpoint import load_model

    return {
        k: load_model(ROOT / "weights" / "mnist5k" / k, kind=k)[0].requires_grad_(False)
        for k in ("generator", "classifier", "inverter")
    }


@functools.cache
def test_set(n: int):
    from invgan_core.data import load_dataset

    t = load_dataset("mnist5k", "test").subset(n)
    return torch.as_tensor(t.images), torch.as_tensor(t.labels), torch.as_tensor(t.ids)


def images(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` test images (repeated if the test set is smaller) and distinct ids."""
    x = test_set(1000)[0]
    x = x.repeat((rows + len(x) - 1) // len(x), 1, 1, 1)[:rows]
    return x, torch.arange(rows)


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def step_flops(G, rows: int) -> int:
    """FLOPs of one projection step (G forward, loss, backward to z) on `rows` rows."""
    x, _ = images(rows)
    z = torch.randn(rows, G.latent_dim, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        per_example_mse(G(z), x).sum().backward()
    return counter.get_total_flops()


def matmul_seconds(n: int = 2048) -> tuple[float, int]:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return seconds(lambda: [a @ b for _ in range(3)]), 3 * 2 * n**3


@functools.cache
def _flop_ratios(quick: bool) -> tuple[dict, float, int]:
    """({rows: FLOPs per row-step, seconds, FLOP/s, ratio}, matmul FLOP/s, steps): `project`'s loop at each batch,
    interleaved with the matmul so both see the same load, on one thread: an eval worker's setting (one torch
    thread per Ray CPU), where a row cannot leave a second core idle. Shared by the figures below (measured once)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure_flop_ratios(quick)
    finally:
        torch.set_num_threads(before)


def _measure_flop_ratios(quick: bool) -> tuple[dict, float, int]:
    G = models()["generator"]
    batches, steps, repeats = ((1, 16, 64), 3, 2) if quick else ((1, 4, 16, 64, 256, 640), 20, 5)
    matmul_seconds()  # warm up MKL
    per_batch, peak = {}, []
    for rows in batches:
        x, ids = images(rows)
        flops = step_flops(G, rows) * steps
        project(G, x, ids=ids, steps=2)
        times = []
        for _ in range(repeats):  # interleaved: the matmul is measured under the same load
            s, f = matmul_seconds()
            peak.append(f / s)
            times.append(seconds(lambda x=x, ids=ids: project(G, x, ids=ids, steps=steps)))
        per_batch[rows] = {
            "flops_per_row_step": flops / steps / rows,
            "seconds": statistics.median(times),
            "flop_per_s": flops / statistics.median(times),
        }
    peak_flops = statistics.median(peak)
    for d in per_batch.values():
        d["ratio"] = d["flop_per_s"] / peak_flops
    return per_batch, peak_flops, steps


def _flop_figure(name: str, quick: bool, head: int, target: float) -> dict:
    per_batch, peak_flops, steps = _flop_ratios(quick)
    head = head if head in per_batch else max(per_batch)
    value = per_batch[head]["ratio"]
    return {
        "name": name,
        "value": value,
        "target": f"≥ {target}",
        "met": value >= target,
        "unit": f"of matmul FLOP/s ({head} rows)",
        "details": {
            "matmul_flop_per_s": peak_flops,
            "steps": steps,
            "threads": 1,
            "by_rows": per_batch,
        },
    }


def projection_flops_vs_matmul(quick: bool) -> dict:
    """At 256 rows, a full batch (issue #23's target: 0.6; #9 asked 0.7)."""
    return _flop_figure("projection_flops_vs_matmul", quick, 256, 0.6)


def projection_flops_vs_matmul_batch16(quick: bool) -> dict:
    """At 16 rows: the late steps of a first-success attack, where only survivors are projected (#23)."""
    return _flop_figure("projection_flops_vs_matmul_batch16", quick, 16, 0.5)


def _variants(G, compile_it: bool) -> tuple[dict, dict]:
    """The step variants tried (issue #9): name -> module to step through, and what building each cost."""
    import copy

    from invgan_core.inversion import step_generator

    cl = copy.deepcopy(G).to(memory_format=torch.channels_last)
    folded = step_generator(G)
    folded_nchw = copy.deepcopy(folded)
    folded_nchw.net = folded_nchw.net.to(memory_format=torch.contiguous_format)
    folded_nchw.forward = lambda z, m=folded_nchw: torch.sigmoid(
        m.net(torch.relu(m.fc(z)).view(-1, m.chans[0], m.start, m.start))
    )
    variants, build = (
        {
            "reference G": G,
            "channels-last weights": cl,
            "folded BN (NCHW)": folded_nchw,
            "folded BN + channels-last (kept)": folded,
        },
        {},
    )
    if compile_it:
        try:
            compiled = torch.compile(step_generator(G), dynamic=False)
            start = time.perf_counter()
            z = torch.randn(8, G.latent_dim, requires_grad=True)
            compiled(z).sum().backward()
            build["torch.compile: compile seconds (first call)"] = time.perf_counter() - start
            variants["folded + torch.compile"] = compiled
        except Exception as err:  # no compiler on this machine: recorded, not fatal
            build["torch.compile"] = f"unavailable: {type(err).__name__}: {err}"[:300]
    return variants, build


def _adam_steps(model, z0: torch.Tensor, x: torch.Tensor, steps: int) -> None:
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        per_example_mse(model(z), x).sum().backward()
        opt.step()


def projection_step_speedups(quick: bool) -> dict:
    """Per-step speed of each variant tried ÷ the reference G, interleaved; value: the kept one."""
    G = models()["generator"].eval()
    rows_list, steps, repeats = ((64,), 2, 2) if quick else ((100, 256), 5, 5)
    variants, build = _variants(G, compile_it=not quick)
    out = {}
    for rows in rows_list:
        x, _ = images(rows)
        z0 = torch.randn(rows, G.latent_dim)
        times = {k: [] for k in variants}
        threads = torch.get_num_threads()
        times[f"kept, {1 if threads > 1 else 2} thread(s) instead of {threads}"] = []
        for _ in range(repeats):
            for k, m in variants.items():
                times[k].append(seconds(lambda m=m, z0=z0, x=x: _adam_steps(m, z0, x, steps)) / steps)
            kept = variants["folded BN + channels-last (kept)"]
            torch.set_num_threads(1 if threads > 1 else 2)
            try:
                times[list(times)[-1]].append(seconds(lambda k=kept, z0=z0, x=x: _adam_steps(k, z0, x, steps)) / steps)
            finally:
                torch.set_num_threads(threads)
        base = statistics.median(times["reference G"])
        out[rows] = {
            k: {"speedup": base / statistics.median(v), "seconds_per_step": statistics.median(v)}
            for k, v in times.items()
        }
    head = out[rows_list[-1]]["folded BN + channels-last (kept)"]["speedup"]
    return {
        "name": "projection_step_speedups",
        "value": head,
        "target": "≥ 1",
        "met": head >= 1,
        "unit": f"× reference G per step ({rows_list[-1]} rows)",
        "details": {"by_rows": out, "build": build},
    }


def reference_loop(G, x: torch.Tensor, z0: torch.Tensor, steps: int, lr: float = 0.05) -> None:
    """The per-example reference: one example and one restart at a time, Adam on a (1, d) latent."""
    for i in range(len(x)):
        for r in range(z0.shape[1]):
            z = z0[i, r : r + 1].clone().requires_grad_(True)
            opt = torch.optim.Adam([z], lr=lr)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                per_example_mse(G(z), x[i : i + 1]).sum().backward()
                opt.step()


def batched_vs_reference_loop(quick: bool) -> dict:
    G = models()["generator"].eval()
    n, restarts, steps, ref_n, repeats = (8, 4, 3, 1, 1) if quick else (32, 10, 20, 2, 3)
    x, ids = images(n)
    z0 = initial_latents(G, x, ids, restarts, "prior", 0)
    project(G, x, ids=ids, steps=1, restarts=restarts)
    batched, reference = [], []
    for _ in range(repeats):  # interleaved
        batched.append(n * restarts * steps / seconds(lambda: project(G, x, ids=ids, steps=steps, restarts=restarts)))
        reference.append(ref_n * restarts * steps / seconds(lambda: reference_loop(G, x[:ref_n], z0[:ref_n], steps)))
    value = statistics.median(batched) / statistics.median(reference)
    return {
        "name": "batched_vs_reference_loop",
        "value": value,
        "target": "≥ 20",
        "met": value >= 20,
        "unit": "×",
        "details": {
            "rows": n * restarts,
            "steps": steps,
            "batched_row_steps_per_s": batched,
            "reference_row_steps_per_s": reference,
        },
    }


# ---------------------------------------------------------------- accuracy against cost


def _candidates(quick: bool) -> list[dict]:
    """Pruning / early-stopping settings tried, cheapest expected first."""
    if quick:
        return [dict(prune_every=3), dict(prune_every=3, early_stop_tol=1e-4, patience=3)]
    return [
        dict(prune_every=10, early_stop_tol=1e-5, patience=20),
        dict(prune_every=10),
        dict(prune_every=20, early_stop_tol=1e-5, patience=20),
        dict(prune_every=20),
    ]


@functools.cache
def accuracy_runs(quick: bool) -> dict:
    """Plain Defense-GAN, its pruned variants and InvGAN at several T on clean and FGSM-transfer inputs."""
    from invgan_core.attacks import FGSM
    from invgan_core.defenses import DefenseGAN, InvGAN

    m = models()
    G, f, I = m["generator"], m["classifier"], m["inverter"]
    n, restarts, steps, ts = (8, 2, 10, (0, 5, 10)) if quick else (100, 10, 200, (0, 5, 10, 25, 50, 100, 200))
    x, y, ids = test_set(n)
    x_adv = FGSM(eps=0.3)(f, x, y, ids=ids).x_adv  # the papers' protocol: attack the classifier, feed the defense

    def measure(defense) -> dict:
        out = {"effective_iterations": 0.0, "seconds": 0.0}
        for name, inputs in (("clean", x), ("fgsm", x_adv)):
            start = time.perf_counter()
            p = defense.purify(inputs, ids)
            out["seconds"] += time.perf_counter() - start
            with torch.no_grad():
                out[name] = (f(p.x).argmax(1) == y).float().mean().item()
            out["effective_iterations"] += float(p.effective_iterations) / 2
        return out

    plain = measure(DefenseGAN(G, f, restarts=restarts, steps=steps)) | {"params": {}}
    pruned = [
        measure(DefenseGAN(G, f, restarts=restarts, steps=steps, **c)) | {"params": c} for c in _candidates(quick)
    ]
    invgan = [measure(InvGAN(G, I, f, steps=t)) | {"params": {"steps": t}} for t in ts]
    with torch.no_grad():
        undefended = {
            "clean": (f(x).argmax(1) == y).float().mean().item(),
            "fgsm": (f(x_adv).argmax(1) == y).float().mean().item(),
        }
    return {
        "n": n,
        "restarts": restarts,
        "steps": steps,
        "plain": plain,
        "pruned": pruned,
        "invgan": invgan,
        "undefended": undefended,
    }


def defensegan_pruned_cost(quick: bool) -> dict:
    runs = accuracy_runs(quick)
    plain = runs["plain"]
    for c in runs["pruned"]:
        c["cost_ratio"] = c["effective_iterations"] / plain["effective_iterations"]
        c["seconds_ratio"] = c["seconds"] / plain["seconds"]
        c["within_tolerance"] = all(c[k] >= plain[k] - TOLERANCE - 1e-9 for k in ("clean", "fgsm"))
    ok = [c for c in runs["pruned"] if c["within_tolerance"]]
    best = min(ok, key=lambda c: c["cost_ratio"]) if ok else None
    value = best["cost_ratio"] if best else 1.0  # nothing cheaper reached it: only plain R x L does
    return {
        "name": "defensegan_pruned_cost",
        "value": value,
        "target": "≤ 0.3",
        "met": value <= 0.3,
        "unit": "of plain R×L restart-steps",
        "details": {"chosen": best and best["params"], "seconds_ratio": best and best["seconds_ratio"], **runs},
    }


def invgan_iterations_to_defensegan(quick: bool) -> dict:
    runs = accuracy_runs(quick)
    plain = runs["plain"]
    reach = [r for r in runs["invgan"] if r["clean"] >= plain["clean"] - TOLERANCE - 1e-9]
    first = min(reach, key=lambda r: r["effective_iterations"]) if reach else None
    value = (first["effective_iterations"] if first else float(runs["invgan"][-1]["effective_iterations"])) / plain[
        "effective_iterations"
    ]
    return {
        "name": "invgan_iterations_to_defensegan",
        "value": value,
        "target": "≤ 0.1",
        "met": bool(first) and value <= 0.1,
        "unit": "of Defense-GAN R×L iterations",
        "details": {
            "defensegan_clean": plain["clean"],
            "first_reaching": first and first["params"],
            "invgan": runs["invgan"],
            "n": runs["n"],
        },
    }


FIGURES = [
    projection_flops_vs_matmul,
    projection_flops_vs_matmul_batch16,
    projection_step_speedups,
    batched_vs_reference_loop,
    defensegan_pruned_cost,
    invgan_iterations_to_defensegan,
]
