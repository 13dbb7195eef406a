"""Batched projection onto the range of a generator: the solver every defense and adaptive attack uses.

    z* = argmin_z ||G(z) - x||²  by gradient steps from R starting points per example (Defense-GAN),
    from I(x) (InvGAN eq. 6), or from given latents; optionally kept in the box [-1, 1]^d by standard
    or stochastic clipping (Lipton & Tripathi).

Examples x restarts form one batch through G. The objective is the *sum* of per-example losses, and
Adam/SGD act coordinate-wise, so each example's trajectory is independent of what else is in the
batch; random starts and clipping draws come from (seed, example id), see `rng.py`.

`FusedGenerator` goes one step further: projections running in different threads (every attack and
defense of an evaluation shard) send each step's rows through G as one batch, each keeping its own
optimiser, step count and stopping rule.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from invgan_core import rng
from invgan_core.models import Generator

OPTIMIZERS = ("adam", "sgd", "momentum")
CONSTRAINTS = (None, "clip", "stochastic_clip")


@dataclass
class Projection:
    z: torch.Tensor  # (N, d) best restart per example
    x: torch.Tensor  # (N, C, H, W) G(z)
    loss: torch.Tensor  # (N,) final ||G(z) - x||² / n (per-pixel mean) of the kept restart
    effective_iterations: int | float  # restart-steps per example, averaged (R x L without pruning; InvGAN Sec. 4.3)
    restart_losses: torch.Tensor  # (N, R) last loss of every restart (a pruned restart: at its checkpoint)
    trace: torch.Tensor | None = None  # (N, steps) loss of the kept restart before each step (NaN after a stop)
    iterations: torch.Tensor | None = None  # (N,) restart-steps spent on each example


def per_example_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(1).mean(1)


def _make_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.7)  # Defense-GAN's setting
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


class _FoldedGenerator(nn.Module):
    """The same function as an eval-mode DCGAN `Generator`, cheaper per step: each batch norm (fixed
    running statistics) folded into the layer before it, convolutions in channels-last layout.

    Equal to G up to float rounding (~1e-6); measured 1.3-1.6x faster per projection step on 64-640
    rows (benchmarks/README.md). Built per `project` call from G's current weights (a few hundred
    thousand numbers), so a G that is still training is never served stale weights.
    """

    def __init__(self, G: Generator):
        super().__init__()
        self.latent_dim, self.prior, self.chans, self.start = G.latent_dim, G.prior, G.chans, G.start
        self.fc = _fold(G.fc[0], G.fc[1])
        layers, mods = [], list(G.net)
        for i, m in enumerate(mods):
            if isinstance(m, nn.BatchNorm2d):
                continue
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            layers.append(_fold(m, nxt) if isinstance(nxt, nn.BatchNorm2d) else copy.deepcopy(m))  # G stays as it is
        # Module.to accepts memory_format (torch docs); torch's stubs do not list it
        self.net = nn.Sequential(*layers).to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(z)).view(-1, self.chans[0], self.start, self.start)
        return torch.sigmoid(self.net(h.contiguous(memory_format=torch.channels_last))).contiguous()


def _fold(module: nn.Module, norm: nn.Module) -> nn.Module:
    """A copy of a Linear / ConvTranspose2d / Conv2d with the eval-mode batch norm after it folded in."""
    layer, bn = cast(nn.Linear, module), cast(_BatchNorm, norm)  # step_generator checked both kinds
    assert bn.running_var is not None and bn.running_mean is not None, "folding needs running statistics"
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    out = copy.deepcopy(layer).requires_grad_(False)
    shape = [1] * out.weight.dim()
    shape[1 if isinstance(out, nn.ConvTranspose2d) else 0] = -1  # the output-channel axis of the weight
    bias = out.bias if out.bias is not None else torch.zeros_like(scale)
    out.weight.mul_(scale.view(shape))
    out.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
    return out


def latent_dim(G: nn.Module) -> int:
    """d of a generator (every generator here has `latent_dim` and `prior` attributes)."""
    return int(getattr(G, "latent_dim"))  # noqa: B009 - getattr: nn.Module's typing sees submodules only


def prior(G: nn.Module) -> str:
    return str(getattr(G, "prior"))  # noqa: B009


def step_generator(G: nn.Module) -> nn.Module:
    """What `project` runs its steps through: `_FoldedGenerator(G)` for a plain DCGAN `Generator`
    whose layers are the ones it knows, G itself for anything else (tests' linear generators, subclasses)."""
    known = (nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.ConvTranspose2d, nn.Conv2d, nn.BatchNorm2d)
    if not isinstance(G, Generator) or type(G) is not Generator:
        return G
    mods = [*G.fc, *G.net]
    foldable = all(
        not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
        or (m.affine and m.track_running_stats and isinstance(prev, (nn.Linear, nn.ConvTranspose2d, nn.Conv2d)))
        for prev, m in zip([None, *mods[:-1]], mods, strict=True)
    )
    if (
        not mods
        or not foldable
        or not all(isinstance(m, known) for m in mods)
        or not isinstance(G.fc[1], nn.BatchNorm1d)
    ):
        return G
    with torch.no_grad():
        return _FoldedGenerator(G).eval()


def initial_latents(G: nn.Module, x: torch.Tensor, ids: torch.Tensor, restarts: int, init, seed: int) -> torch.Tensor:
    """Starting latents (N, R, d): 'prior' draws per (seed, id, restart); an inverter gives I(x)
    for restart 0 and prior draws for the rest; a tensor (N, d) or (N, R, d) is used as given."""
    n, d = x.shape[0], latent_dim(G)
    if isinstance(init, str):
        if init != "prior":
            raise ValueError(f"init must be 'prior', an inverter module or a latent tensor, got {init!r}")
        return rng.sample_latents(prior(G), seed, ids, restarts, d).to(x.device)
    if isinstance(init, nn.Module):
        z0 = rng.sample_latents(prior(G), seed, ids, restarts, d).to(x.device)
        with torch.no_grad():
            z0[:, 0] = init(x)
        return z0
    z = torch.as_tensor(init, dtype=torch.float32, device=x.device)
    if z.shape == (n, d):
        z = z[:, None].expand(n, restarts, d)
    if z.shape != (n, restarts, d):
        raise ValueError(f"init latents have shape {tuple(z.shape)}; expected ({n}, {d}) or ({n}, {restarts}, {d})")
    return z.clone()


def _apply_constraint(
    z: torch.Tensor,
    constraint: str | None,
    seed: int,
    ids: torch.Tensor,
    restarts: int,
    step: int,
    rows: torch.Tensor | None = None,
) -> None:
    """In place. 'clip': clamp to [-1, 1]. 'stochastic_clip': re-draw out-of-box coordinates uniformly.

    `rows`: which (example x restart) rows z holds (example * restarts + restart), when not all of them."""
    if constraint is None:
        return
    if constraint == "clip":
        z.clamp_(-1, 1)
    elif constraint == "stochastic_clip":
        out = z.abs() > 1
        if out.any():
            n, d = ids.numel(), z.shape[-1]
            fresh = (
                rng.uniform(rng.latent_keys(seed, ids, restarts, d, step)).to(z.device).reshape(n * restarts, d) * 2 - 1
            )
            z[out] = (fresh if rows is None else fresh[rows])[out]
    else:
        raise ValueError(f"unknown constraint {constraint!r}; choose one of {CONSTRAINTS}")


class _Active:
    """The rows still being optimised: k restarts for each of the active examples, grouped by example.

    `ex`, `r`: example and restart index of each row. Every active example has the same k (halving
    keeps ceil(k/2) of each, early stopping removes whole examples), so `(n_active, k)` views work and
    every decision about an example looks at its own k rows only: batch composition cannot change it.
    """

    def __init__(self, z: torch.Tensor, n: int, restarts: int, make_opt):
        self.ex = torch.arange(n, device=z.device).repeat_interleave(restarts)
        self.r = torch.arange(restarts, device=z.device).repeat(n)
        self.k, self.make_opt = restarts, make_opt
        self.z = z.detach().requires_grad_(True)
        self.opt = make_opt([self.z])

    def keep(self, rows: torch.Tensor, k: int) -> None:
        """Keep only `rows` (sorted, grouped by example, k each), carrying gradients and optimiser state."""
        z = self.z.detach()[rows].clone().requires_grad_(True)
        z.grad = None if self.z.grad is None else self.z.grad[rows]
        opt = self.make_opt([z])
        old = self.opt.state.get(self.z)
        if old:  # Adam's moments, SGD's momentum: per coordinate, so slicing keeps each row's trajectory
            opt.state[z] = {key: v[rows] if torch.is_tensor(v) and v.dim() > 0 else v for key, v in old.items()}
        self.ex, self.r, self.k, self.z, self.opt = self.ex[rows], self.r[rows], k, z, opt

    def groups(self) -> torch.Tensor:
        return self.ex[:: self.k]  # the example index of each active group


@contextmanager
def _frozen_eval(G: nn.Module):
    """G in eval mode without parameter gradients, restored afterwards (nothing to do, and nothing touched, if
    it is so already: concurrent projections in a `FusedGenerator` share a G frozen once for all)."""
    if not G.training and not any(p.requires_grad for p in G.parameters()):
        yield
        return
    was_training, flags = G.training, [p.requires_grad for p in G.parameters()]
    G.eval()  # batch norm must use its running statistics, or examples would interact
    G.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(G.parameters(), flags, strict=True):
            p.requires_grad_(f)
        G.train(was_training)


class _Result:
    """Per-example outputs, filled in as examples finish (early) or at the end."""

    def __init__(self, x: torch.Tensor, d: int, restarts: int, steps: int, keep_trace: bool):
        n = x.shape[0]
        self.z = torch.empty(n, d, device=x.device)
        self.x = torch.empty_like(x)
        self.loss = torch.empty(n, device=x.device)
        self.restart_losses = torch.full((n, restarts), float("nan"), device=x.device)
        self.iterations = torch.zeros(n, dtype=torch.int64, device=x.device)
        self.best = torch.zeros(n, dtype=torch.int64, device=x.device)
        # CPU: the loss trace is a record for plots (steps x N x R), kept off the accelerator's memory
        self.trace = torch.full((steps, n, restarts), float("nan")) if keep_trace else None

    def finish(self, act: _Active, groups: torch.Tensor, out: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Record the best restart of the active groups `groups` (positions); returns their rows."""
        k = act.k
        rows = (groups[:, None] * k + torch.arange(k, device=groups.device)).reshape(-1)
        best = rows.view(-1, k)[torch.arange(len(groups), device=groups.device), losses[rows].view(-1, k).argmin(1)]
        ex = act.ex[best]
        self.z[ex], self.x[ex], self.loss[ex], self.best[ex] = (
            act.z.detach()[best],
            out[best],
            losses[best],
            act.r[best],
        )
        return rows


def _early_stop(losses: torch.Tensor, k: int, best: torch.Tensor, since: torch.Tensor, tol: float, patience: int):
    """Keras-style per-example early stopping on the best loss among the example's restarts."""
    cur = losses.view(-1, k).min(1).values
    improved = cur < best - tol
    best = torch.where(improved, cur, best)
    since = torch.where(improved, torch.zeros_like(since), since + 1)
    return best, since, since >= patience


def project(
    G: nn.Module,
    x: torch.Tensor,
    *,
    ids,
    init="prior",
    steps: int = 200,
    lr: float = 0.05,
    restarts: int = 1,
    optimizer: str = "adam",
    constraint: str | None = None,
    seed: int = 0,
    keep_trace: bool = False,
    prune_every: int | None = None,
    early_stop_tol: float | None = None,
    patience: int = 20,
    fast: bool = True,
) -> Projection:
    """Project images x (N, C, H, W) onto the range of G; keeps the restart with the lowest final loss.

    Plain R x L by default (Defense-GAN). `prune_every`: successive halving, every `prune_every` steps
    each example keeps the better half (ceil) of its remaining restarts, ranked by their current loss.
    `early_stop_tol`: an example stops once its best restart's loss has not dropped by more than
    `early_stop_tol` for `patience` steps. Both decide per example from its own restarts only.
    `fast`: step through `step_generator(G)` (the same function, batch norm folded; False: G itself).
    """
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
    if constraint not in CONSTRAINTS:
        raise ValueError(f"unknown constraint {constraint!r}; choose one of {CONSTRAINTS}")
    if prune_every is not None and prune_every < 1 or patience < 1:
        raise ValueError(f"need prune_every >= 1 (or None) and patience >= 1, got {prune_every}, {patience}")
    ids = torch.as_tensor(ids, dtype=torch.int64, device=x.device).reshape(-1)
    n, d = x.shape[0], latent_dim(G)
    if ids.numel() != n:
        raise ValueError(f"got {ids.numel()} ids for {n} images")
    with _frozen_eval(G):
        x = x.detach()
        z0 = initial_latents(G, x, ids, restarts, init, seed).reshape(n * restarts, d)
        _apply_constraint(z0, constraint, seed, ids, restarts, step=-2)
        act = _Active(z0, n, restarts, lambda params: _make_optimizer(optimizer, params, lr))
        G_step = _stepper(G, fast)
        res = _Result(x, d, restarts, steps, keep_trace)
        best, since = (
            torch.full((n,), float("inf"), device=x.device),
            torch.zeros(n, dtype=torch.int64, device=x.device),
        )
        for t in range(steps):
            if len(act.ex) == 0:
                break
            out, losses, grad = G_step(act.z.detach(), x[act.ex])
            act.z.grad = grad
            res.restart_losses[act.ex, act.r] = losses
            if res.trace is not None:
                res.trace[t, act.ex.cpu(), act.r.cpu()] = losses.cpu()
            keep = torch.ones(len(act.ex), dtype=torch.bool, device=x.device)
            if early_stop_tol is not None:
                g = act.groups()
                best[g], since[g], stop = _early_stop(losses, act.k, best[g], since[g], early_stop_tol, patience)
                if stop.any():
                    keep[res.finish(act, stop.nonzero()[:, 0], out, losses)] = False
            k = act.k
            if prune_every is not None and t > 0 and t % prune_every == 0 and k > 1:
                k = (k + 1) // 2
                order = losses.view(-1, act.k).topk(k, dim=1, largest=False).indices.sort(dim=1).values
                halved = torch.zeros_like(keep).view(-1, act.k).scatter_(1, order, True).view(-1)
                keep &= halved
            if not keep.all() or k != act.k:
                act.keep(keep.nonzero()[:, 0], k)
            res.iterations[act.groups()] += act.k
            act.opt.step()
            with torch.no_grad():
                _apply_constraint(act.z.data, constraint, seed, ids, restarts, step=t, rows=act.ex * restarts + act.r)
        with torch.no_grad():
            if len(act.ex):
                out, losses, _ = G_step(act.z.detach(), x[act.ex])
                res.restart_losses[act.ex, act.r] = losses
                res.finish(act, torch.arange(len(act.ex) // act.k, device=x.device), out, losses)
        return _projection(res, n, steps)


def _projection(res: _Result, n: int, steps: int) -> Projection:
    trace = None
    if res.trace is not None:
        trace = res.trace[:, torch.arange(n), res.best.cpu()].T.contiguous()  # CPU, as the trace
    iterations = res.iterations.cpu()
    mean = iterations.double().mean().item() if n else 0.0
    return Projection(
        z=res.z,
        x=res.x,
        loss=res.loss,
        effective_iterations=int(mean) if mean == int(mean) else mean,
        restart_losses=res.restart_losses,
        trace=trace,
        iterations=iterations,
    )


# ---------------------------------------------------------------- one batch through G for many projections

Step = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]


# On a CPU, every pass through G holds a multiple of CPU_BLOCK rows (a batch is padded with zero rows, dropped
# after) and at most ~CPU_ROWS. Measured on the shipped generators (torch 2.13 CPU, oneDNN; 1 and 2 threads): at
# a multiple of 8 rows, each row's G(z), loss and gradient are bit-identical whatever the batch size and whatever
# else is in it, while 1-3, 5, 7 or 9 rows take other kernel paths that differ in the last bits (enough to move a
# long projection of an adversarial input, and the step at which BPDA fools it). So a projection's steps from
# given starting latents do not depend on the batch, nor on what a fused step holds (tests/core/test_inversion.py
# checks it on this machine's CPU; an inverter's starting point and the classifier are not padded).
# Beyond ~100 rows the activations leave the core's cache and the rate falls (one thread: 5,300 row-steps/s
# at 24-128 rows, 4,100 at 256; benchmarks/README.md), hence the pieces.
CPU_BLOCK, CPU_ROWS = 8, 64


def _rows_step(G_step: nn.Module, z: torch.Tensor, target: torch.Tensor):
    """G(z), the per-row losses ||G(z) - target||² / n and their gradients in z, all detached. The objective is
    the *sum* of the rows' losses: row i's gradient is its own loss's, whatever else is in the batch (so a
    batch may be padded and go through in pieces: `CPU_BLOCK`, `CPU_ROWS`)."""
    if z.device.type != "cpu":
        return _one_pass(G_step, z, target)
    n = len(z)
    padded = math.ceil(n / CPU_BLOCK) * CPU_BLOCK
    if padded != n:
        z = torch.cat([z.detach(), z.new_zeros(padded - n, *z.shape[1:])])
        target = torch.cat([target, target.new_zeros(padded - n, *target.shape[1:])])
    pieces = math.ceil(padded / CPU_ROWS)
    size = math.ceil(padded / pieces / CPU_BLOCK) * CPU_BLOCK  # near-equal pieces, each a multiple of the block
    parts = [_one_pass(G_step, a, b) for a, b in zip(z.split(size), target.split(size), strict=True)]
    out, losses, grad = (torch.cat(p)[:n] for p in zip(*parts, strict=True))
    return out, losses, grad


def _one_pass(G_step: nn.Module, z: torch.Tensor, target: torch.Tensor):
    with torch.enable_grad():  # a projection is an optimisation, even when called under no_grad
        z = z.detach().requires_grad_(True)
        out = G_step(z)
        losses = per_example_mse(out, target)
        (grad,) = torch.autograd.grad(losses.sum(), z)
    return out.detach(), losses.detach(), grad


def _stepper(G: nn.Module, fast: bool) -> Step:
    """What `project` calls at each step: the fused batch of this thread's `FusedGenerator` session when it
    serves G, else one step of `step_generator(G)` (or of G itself when not `fast`) on these rows alone."""
    session, index = getattr(_member, "session", None), getattr(_member, "index", None)
    if fast and session is not None and session.G is G:
        return lambda z, target: session.step(index, z, target)
    G_step = step_generator(G) if fast else G
    return lambda z, target: _rows_step(G_step, z, target)


_member = threading.local()  # the FusedGenerator session this thread takes part in, its index, its clock


def busy_clock() -> float:
    """Seconds for timing work: `time.perf_counter()` outside a `FusedGenerator`; inside one, this thread's CPU
    time with the fused steps it computed taken out and its share of every fused step it took part in put in
    (the step's wall time split by rows). The projections of one shard run side by side, so wall time would
    count each of them for the whole shard; this charges each its own part."""
    if getattr(_member, "session", None) is None:
        return time.perf_counter()
    return time.thread_time() - _member.excluded + _member.share


class FusedGenerator:
    """One batch through G for every projection step of the threads taking part (`member`).

    A projection that runs in a member thread hands each step's rows to `step` and waits; when every member
    is waiting (or has left), the rows of all of them go through G as one batch, ordered by member index, and
    each gets its own G(z), losses and gradients back. Every projection keeps its own optimiser, step count
    and stopping rule, so its trajectory is the one it has alone, up to the float rounding of a larger batch.
    Each round holds exactly one step of every member, so which rows share a batch does not depend on thread
    timing. Small batches run far below the matmul rate (benchmarks/README.md): fusing the survivors of many
    attacks fills them.
    """

    def __init__(self, G: nn.Module, members: int):
        self.G, self.G_step = G, step_generator(G)
        self._cv = threading.Condition()
        # every member counts from the start: a round waits for all of them, whichever thread starts first
        self._members = members
        self._pending: dict[int, list] = {}  # index -> [z, target, result, error, share]
        self.rounds, self.rows = 0, 0  # fused steps computed, rows they held (batch size = rows / rounds)

    @contextmanager
    def member(self, index: int) -> Iterator[None]:
        """This thread is member `index` (one of `members`; orders the rows in the batch) until the block ends,
        then leaves: later rounds wait for the others only. G must stay frozen meanwhile (`run_fused` does it)."""
        _member.session, _member.index, _member.excluded, _member.share = self, index, 0.0, 0.0
        try:
            yield
        finally:
            _member.session = None
            with self._cv:
                self._members -= 1
                self._run_if_ready()

    def step(self, index: int, z: torch.Tensor, target: torch.Tensor):
        started = time.thread_time()
        request: list = [z.detach(), target, None, None, 0.0]
        with self._cv:
            self._pending[index] = request
            self._run_if_ready()
            while request[2] is None and request[3] is None:
                self._cv.wait()
        _member.excluded += time.thread_time() - started
        _member.share += request[4]
        if request[3] is not None:
            raise RuntimeError("the fused generator step failed (see the cause above)") from request[3]
        return request[2]

    def _run_if_ready(self) -> None:
        """With the lock held: compute the round once every member has handed in its rows."""
        if not self._pending or len(self._pending) < self._members:
            return
        batch = [self._pending[i] for i in sorted(self._pending)]
        self._pending = {}
        sizes = [len(r[0]) for r in batch]
        started = time.perf_counter()
        try:
            out, losses, grad = _rows_step(
                self.G_step, torch.cat([r[0] for r in batch]), torch.cat([r[1] for r in batch])
            )
        except Exception as err:  # every member raises it: none of them may wait for a batch that never comes
            for r in batch:
                r[3] = err
        else:
            seconds, total = time.perf_counter() - started, sum(sizes)
            for r, o, l_, g in zip(batch, out.split(sizes), losses.split(sizes), grad.split(sizes), strict=True):
                r[2], r[4] = (o, l_, g), seconds * len(r[0]) / max(total, 1)
            self.rounds, self.rows = self.rounds + 1, self.rows + total
        self._cv.notify_all()


def run_fused(G: nn.Module | None, tasks: Sequence[Callable[[], object]], *, fused: bool = True) -> list[object]:
    """Run `tasks` (functions of no arguments) and return their results in order. `fused` (and a G): each task
    in its own thread, every projection through G they make fused into one batch per step (`FusedGenerator`);
    otherwise one after the other. The first task that raises is re-raised once all have stopped."""
    if not fused or G is None or len(tasks) < 2:
        return [task() for task in tasks]
    session = FusedGenerator(G, members=len(tasks))

    def run(i: int, task):
        with session.member(i):
            return task()

    with _frozen_eval(G):
        results: list = [None] * len(tasks)
        errors: list = [None] * len(tasks)

        def target(i: int, task) -> None:
            try:
                results[i] = run(i, task)
            except BaseException as err:  # noqa: BLE001 - handed to the caller below
                errors[i] = err

        threads = [threading.Thread(target=target, args=(i, t), daemon=True) for i, t in enumerate(tasks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results
