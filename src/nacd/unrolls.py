"""The differentiable student unroll: theta_N after N SGD steps from an expert snapshot, as a function
of the prompts D_syn and the student lr alpha (paper Algorithm 1), in three modes behind :func:`unroll`:

- ``naive``: autograd through the N steps with ``create_graph=True``; exact; memory
  grows with N (every step's second-order graph is alive until the backward).
- ``flat``: exact and memory-flat. The forward pass takes N - 1 plain steps, keeping only
  theta_0..theta_{N-1} (LoRA tensors, small), then the last step with its second-order graph.
  The backward pass walks the steps in reverse, from that kept graph, and rebuilds each earlier
  step's second-order graph alone. With lambda_n =
  dL/dtheta_n and g_n the gradient of step n at theta_{n-1}:
  dL/dalpha -= <g_n, lambda_n>; dL/dp_n -= alpha * d<g_n, lambda_n>/dp_n;
  lambda_{n-1} = lambda_n - alpha * H_n lambda_n (H_n lambda_n = d<g_n, lambda_n>/dtheta:
  one double-backward gives both).
- ``fd``: approximate, memory-flat, without any double backward: the same reverse walk, but H_n lambda_n
  and the mixed product for the prompts are central finite differences of gradients,
  (grad(theta + eps lambda) - grad(theta - eps lambda)) / 2 eps: two plain gradients per
  step, no double backward. Its error depends on the model (measured from 1% to 300x),
  so ``nacd distill`` checks it against ``flat`` before the first update
  (:func:`fd_relative_error`, ``distill.fd_check``) and uses ``flat`` when it is off.

:func:`choose_unroll` picks the mode a run uses (``distill.unroll: auto``: naive where its
predicted memory fits, else flat). The forward student steps and everything first-order run
on the model's attention as loaded (SDPA's fast kernels by default); only the graphs that
are differentiated twice run under :func:`nacd.models.double_backward_attention`.

Importing this module imports torch; the stage module :mod:`nacd.distill` imports it
only when it runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from nacd.errors import NacdError
from nacd.models import double_backward_attention
from nacd.student import Student
from nacd.tm import global_norm, matching_loss

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: scale = max_norm / (norm + 1e-6), at most 1


def clip_scale(norm: Any, clip: float | None) -> Any:
    """The factor ``torch.nn.utils.clip_grad_norm_`` multiplies a gradient of norm ``norm`` by (differentiable)."""
    if clip is None:
        return torch.ones_like(norm)
    return torch.clamp(clip / (norm + CLIP_EPS), max=1.0)


def clip_vjp(grads: Sequence[Any], lam: Sequence[Any], clip: float | None) -> tuple[Any, list[Any]]:
    """For the clipped step s(g) = g * clip_scale(||g||): ``(<s(g), lam>, (ds/dg)^T lam)``.

    Unclipped, ds/dg = I. Clipped (c / (n + eps) < 1, n = ||g||): s = c g / (n + eps), so
    ds/dg = c / (n + eps) I - c g g^T / (n (n + eps)^2), a symmetric matrix.
    """
    norm = global_norm(grads)
    g_lam = sum((g * li).sum() for g, li in zip(grads, lam, strict=True))
    scale = clip_scale(norm, clip)
    if clip is None or float(scale) >= 1.0:
        return g_lam, list(lam)
    radial = clip * g_lam / (norm * (norm + CLIP_EPS) ** 2)
    return scale * g_lam, [scale * li - radial * g for g, li in zip(grads, lam, strict=True)]


def _sgd_step(theta: Sequence[Any], grads: Sequence[Any], alpha: Any, clip: float | None) -> list[Any]:
    """theta - alpha * s(g), s the clipping of ``torch.nn.utils.clip_grad_norm_`` (differentiable where
    its inputs are)."""
    scale = clip_scale(global_norm(grads), clip)
    return [t - alpha * scale * g for t, g in zip(theta, grads, strict=True)]


def unroll_naive(
    student: Student, theta0: Sequence[Any], alpha: Any, syn: Any, batches: Sequence[Any], clip: float | None = None
) -> list[Any]:
    """N differentiable SGD steps through plain autograd (``create_graph=True``)."""
    theta = [t.detach().requires_grad_(True) for t in theta0]
    with double_backward_attention():  # the whole graph is differentiated twice
        for idx in batches:
            loss = student.step_loss(theta, syn[idx], student.text_batch(idx.tolist()))
            grads = torch.autograd.grad(loss, theta, create_graph=True)
            student.record_step(loss, grads)
            theta = _sgd_step(theta, grads, alpha, clip)
    return theta


def _rng_state(device: Any) -> tuple[Any, Any]:
    """The random state a student step draws its dropout masks from (CPU, and the accelerator's)."""
    device = torch.device(device)
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextmanager
def _replayed_rng(state: tuple[Any, Any], device: Any) -> Iterator[None]:
    """Run the block with the random state ``state`` (the one a forward step saw), leaving the
    caller's state as it was (``torch.random.fork_rng``): a step rebuilt in the reverse walk draws
    the same LoRA-dropout masks as the step it rebuilds, as ``torch.utils.checkpoint`` does."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if state[1] is not None else [], device_type=device.type):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _step_grads(student: Student, theta: Sequence[Any], p: Any, idx: Any, create_graph: bool) -> tuple[Any, list[Any]]:
    """Loss of one student step and its gradients w.r.t. theta, and w.r.t. p when p requires grad."""
    loss = student.step_loss(theta, p, student.text_batch(idx.tolist()))
    wrt = [*theta, p] if p.requires_grad else list(theta)
    return loss, list(torch.autograd.grad(loss, wrt, create_graph=create_graph))


def _plain_step(
    student: Student, theta: Sequence[Any], p: Any, idx: Any, alpha: Any, clip: float | None
) -> tuple[list[Any], Any, list[Any]]:
    """One plain (first-order) clipped student step from ``theta``: (theta_next, loss, gradients
    w.r.t. theta), all detached."""
    with torch.enable_grad():
        th = [t.detach().clone().requires_grad_(True) for t in theta]
        loss, g = _step_grads(student, th, p.detach(), idx, create_graph=False)
    g = [x.detach() for x in g]
    return _sgd_step([t.detach() for t in theta], g, alpha, clip), loss.detach(), g


def endpoint(
    student: Student, theta0: Sequence[Any], alpha: Any, syn: Any, batches: Sequence[Any], clip: float | None = None
) -> list[Any]:
    """theta_N after the N plain clipped student steps of an unroll, without any graph: what the
    student reaches (for evaluation; the unrolls give the same point, differentiably)."""
    theta = [t.detach() for t in theta0]
    alpha = torch.as_tensor(alpha).detach()
    for idx in batches:
        theta, _, _ = _plain_step(student, theta, syn[idx], idx, alpha, clip)
    return theta


def _forward_steps(
    student: Student,
    theta0: Sequence[Any],
    alpha: Any,
    syn: Any,
    batches: Sequence[Any],
    clip: float | None = None,
) -> tuple[list[list[Any]], list[list[Any]], list[Any], list[Any]]:
    """The forward pass of the flat and fd modes: plain (clipped) steps on ``batches``, keeping the theta
    each started from, its gradients (LoRA-sized; the reverse walk needs them for the clipping Jacobian)
    and the random state it started from (its dropout masks)."""
    thetas, grads, rngs = [], [], []
    theta = [t.detach() for t in theta0]
    for idx in batches:
        thetas.append(theta)
        rngs.append(_rng_state(student.device))
        nxt, loss, g = _plain_step(student, theta, syn[idx], idx, alpha, clip)
        grads.append(g)
        student.record_step(loss, g)
        theta = nxt
    return thetas, grads, theta, rngs


def _zeros_if_none(grads: Sequence[Any], like: Sequence[Any]) -> list[Any]:

    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]


def _reverse_walk(thetas, grads, batches, alpha, syn, lam, products, clip=None) -> tuple[Any, Any, list[Any]]:
    """dL/dalpha, dL/dD_syn and dL/dtheta_0 from lambda_N = dL/dtheta_N, walking the steps backwards.

    Step n is theta_n = theta_{n-1} - alpha * s(g_n) with s the (optional) norm clipping; with
    u = (ds/dg)^T lambda_n (:func:`clip_vjp`; u = lambda_n unclipped): dL/dalpha -= <s(g_n), lambda_n>,
    dL/dp_n -= alpha * d<g_n, u>/dp_n, lambda_{n-1} = lambda_n - alpha * H_n u.
    ``products(n, theta_prev, idx, u)`` returns ``[H_n u ..., d<g_n, u>/dp_n]``:
    exactly (one double-backward) in flat mode, by finite differences in fd mode.
    """
    a = alpha.detach()
    lam = _zeros_if_none(lam, thetas[0])
    d_alpha = torch.zeros_like(a)
    d_syn = torch.zeros_like(syn)
    for n in reversed(range(len(batches))):
        dot, u = clip_vjp(grads[n], lam, clip)
        hv = products(n, thetas[n], batches[n], u)
        d_alpha = d_alpha - dot
        d_syn.index_add_(0, batches[n], -a * hv[-1])
        lam = [li - a * hi for li, hi in zip(lam, hv[:-1], strict=True)]
    return d_alpha, d_syn, lam


def _graph_step(student: Student, theta: Sequence[Any], syn: Any, idx: Any) -> tuple[list[Any], Any, Any, list[Any]]:
    """One student step's loss and LoRA gradient *with* their second-order graph: ``(theta leaves,
    prompt leaf, loss, gradients w.r.t. theta)``. Only theta's gradient is built (the prompts' own
    first-order gradient is never needed); the double backward reaches the prompts through the graph."""
    with torch.enable_grad(), double_backward_attention():
        th = [t.detach().clone().requires_grad_(True) for t in theta]
        p = syn[idx].detach().clone().requires_grad_(True)
        loss = student.step_loss(th, p, student.text_batch(idx.tolist()))
        g = list(torch.autograd.grad(loss, th, create_graph=True))
    return th, p, loss, g


def _double_backward(th: Sequence[Any], p: Any, g: Sequence[Any], lam: Sequence[Any]) -> list[Any]:
    """``[H u ..., d<g, u>/dp]`` from a step's graph (:func:`_graph_step`), u = ``lam``; frees the graph."""
    with torch.enable_grad(), double_backward_attention():
        dot = sum((gi * li).sum() for gi, li in zip(g, lam, strict=True))
        hv = torch.autograd.grad(dot, [*th, p], allow_unused=True)
    return _zeros_if_none(hv, [*th, p])


def _exact_products(student: Student, syn: Any, rngs: Sequence[Any], kept: dict[int, Any] | None = None):
    """Flat's products: step n's graph rebuilt (with its dropout masks replayed), or the one the forward
    pass kept for it in ``kept`` (used once, then dropped)."""
    kept = {} if kept is None else kept

    def products(n: int, theta_prev: Sequence[Any], idx: Any, lam: Sequence[Any]) -> list[Any]:
        if n in kept:
            th, p, g = kept.pop(n)
        else:
            with _replayed_rng(rngs[n], student.device):
                th, p, _, g = _graph_step(student, theta_prev, syn, idx)
        return _double_backward(th, p, g, lam)

    return products


def fd_step(rel_eps: float | None, dtype: Any) -> float:
    """fd's relative step: ``distill.fd_eps``, or (None) the cube root of the working precision's machine
    epsilon, which balances a central difference's truncation (eps^2) and rounding (machine eps / eps)
    errors. The working precision is float32's at best: transformers computes norms and rotary
    embeddings in float32 even in a float64 model."""
    if rel_eps is not None:
        return rel_eps
    return max(float(torch.finfo(dtype).eps), float(torch.finfo(torch.float32).eps)) ** (1 / 3)


def _fd_products(student: Student, syn: Any, rel_eps: float, rngs: Sequence[Any]):
    """Hessian(-mixed) products by central differences of the step's gradient along ``lam``."""

    def products(n: int, theta_prev: Sequence[Any], idx: Any, lam: Sequence[Any]) -> list[Any]:
        lam_norm = global_norm(lam)
        th_norm = global_norm(theta_prev)
        eps = rel_eps * torch.clamp(th_norm, min=1.0) / torch.clamp(lam_norm, min=1e-30)
        sides = []
        for sign in (1.0, -1.0):
            with torch.enable_grad(), _replayed_rng(rngs[n], student.device):
                th = [(t + sign * eps * li).requires_grad_(True) for t, li in zip(theta_prev, lam, strict=True)]
                p = syn[idx].detach().clone().requires_grad_(True)
                sides.append(_step_grads(student, th, p, idx, create_graph=False)[1])
        return [(x1 - x2) / (2 * eps) for x1, x2 in zip(*sides, strict=True)]

    return products


class _Flat(torch.autograd.Function):
    """Exact, memory-flat: N - 1 plain steps forward, then the last step with its second-order graph,
    which the reverse walk uses first (instead of rebuilding it: one student step fewer per outer step,
    at no extra peak memory, since the walk holds one step's graph anyway); the walk then rebuilds one
    step's graph at a time."""

    @staticmethod
    def forward(ctx, student, batches, alpha, syn, clip, *theta0):  # type: ignore[override]
        a = alpha.detach()
        keep = bool(batches) and any(ctx.needs_input_grad)  # no graph to keep for a caller without grad
        plain = batches[:-1] if keep else batches
        thetas, grads, theta, rngs = _forward_steps(student, theta0, a, syn, plain, clip)
        ctx.kept = {}
        if keep:
            n = len(batches) - 1
            thetas.append(theta)
            rngs.append(_rng_state(student.device))
            th, p, loss, g = _graph_step(student, theta, syn, batches[n])
            ctx.kept[n] = (th, p, g)
            step = [x.detach() for x in g]
            grads.append(step)
            student.record_step(loss, step)
            theta = _sgd_step([t.detach() for t in theta], step, a, clip)
        ctx.student, ctx.batches, ctx.thetas, ctx.grads = student, batches, thetas, grads
        ctx.clip, ctx.rngs = clip, rngs
        ctx.save_for_backward(alpha, syn)
        return tuple(theta)

    @staticmethod
    def backward(ctx, *lam):  # type: ignore[override]
        alpha, syn = ctx.saved_tensors
        products = _exact_products(ctx.student, syn, ctx.rngs, ctx.kept)
        d_alpha, d_syn, lam0 = _reverse_walk(ctx.thetas, ctx.grads, ctx.batches, alpha, syn, lam, products, ctx.clip)
        return (None, None, d_alpha, d_syn, None, *lam0)


class _FD(torch.autograd.Function):
    """Approximate, memory-flat: the reverse walk with central finite-difference Hessian products."""

    @staticmethod
    def forward(ctx, student, batches, alpha, syn, rel_eps, clip, *theta0):  # type: ignore[override]
        thetas, grads, theta_n, rngs = _forward_steps(student, theta0, alpha.detach(), syn, batches, clip)
        ctx.student, ctx.batches, ctx.thetas, ctx.grads, ctx.rel_eps = student, batches, thetas, grads, rel_eps
        ctx.clip, ctx.rngs = clip, rngs
        ctx.save_for_backward(alpha, syn)
        return tuple(theta_n)

    @staticmethod
    def backward(ctx, *lam):  # type: ignore[override]
        alpha, syn = ctx.saved_tensors
        products = _fd_products(ctx.student, syn, ctx.rel_eps, ctx.rngs)
        d_alpha, d_syn, lam0 = _reverse_walk(ctx.thetas, ctx.grads, ctx.batches, alpha, syn, lam, products, ctx.clip)
        return (None, None, d_alpha, d_syn, None, None, *lam0)


def unroll(
    mode: str,
    student: Student,
    theta0: Sequence[Any],
    alpha: Any,
    syn: Any,
    batches: Sequence[Any],
    fd_eps: float | None = None,
    clip: float | None = None,
) -> list[Any]:
    """theta_N after N student steps from ``theta0``, differentiable in ``alpha`` and ``syn``.

    Each step is theta - alpha * g, with g's norm clipped to ``clip`` as
    ``torch.nn.utils.clip_grad_norm_`` does (None: no clipping); the clipping is differentiated too.
    """
    theta0 = [t.detach() for t in theta0]
    if mode == "auto":  # decided per run by choose_unroll; a bare call takes the safe exact mode
        mode = "flat"
    if mode == "naive":
        return unroll_naive(student, theta0, alpha, syn, batches, clip)
    if mode == "flat":
        return list(_Flat.apply(student, list(batches), alpha, syn, clip, *theta0))
    if mode == "fd":
        eps = fd_step(fd_eps, theta0[0].dtype)
        return list(_FD.apply(student, list(batches), alpha, syn, eps, clip, *theta0))
    raise NacdError(f"distill.unroll={mode!r}: expected auto, flat, naive or fd")


def _available_memory() -> int:
    """Bytes the system could still give this process on the CPU (Linux MemAvailable); 0 without /proc."""
    from pathlib import Path

    try:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024  # kB
    except (OSError, StopIteration, ValueError, IndexError):
        return 0


def naive_step_bytes(student: Student, theta0: Sequence[Any], alpha: Any, syn: Any, idx: Any) -> int:
    """Memory one ``naive`` step's second-order graph holds (it keeps N of them until the backward): the
    storages the step's autograd graph saves, counted once each, the model's own weights left out."""
    weights = {p.untyped_storage().data_ptr() for p in student.model.parameters()}
    saved: dict[tuple[str, int], int] = {}

    def pack(t: Any) -> Any:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[(str(t.device), storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        theta = unroll_naive(student, theta0, alpha.detach(), syn.detach().requires_grad_(True), [idx])
    del theta
    student.steps.clear()
    return sum(saved.values())


def choose_unroll(
    requested: str,
    student: Student,
    theta0: Sequence[Any],
    target: Sequence[Any],
    alpha: Any,
    syn: Any,
    batches: Sequence[Any],
    fd_eps: float | None = None,
    fd_check: float | None = None,
    clip: float | None = None,
) -> dict[str, Any]:
    """The unroll a run uses, decided on one draw before the first update: ``auto`` -> ``naive`` (the
    fastest exact mode on small models) when N+1 of its steps' graphs fit in half the free memory (on the
    CPU: of this process's share, the free memory over ``LOCAL_WORLD_SIZE``), else ``flat``; ``fd`` ->
    ``fd`` when within ``fd_check`` of the exact gradient, else ``flat``; others as asked.
    Returns ``{"requested", "used", ...the figures behind the choice}``."""
    info: dict[str, Any] = {"requested": requested, "used": requested}
    if requested == "auto":
        device = torch.device(student.device)
        step = naive_step_bytes(student, theta0, alpha, syn, batches[0])
        if device.type == "cuda":  # each process has a GPU of its own (nacd.models.resolve_device)
            free = torch.cuda.mem_get_info(device)[0]
        else:  # the node's processes share the CPU's memory, and each decides alone
            free = _available_memory() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        need = (len(batches) + 1) * step
        info.update(used="naive" if need < free / 2 else "flat", naive_bytes=need, free_bytes=free)
    elif requested == "fd" and fd_check is not None:
        err = fd_relative_error(student, theta0, target, alpha, syn, batches, fd_eps, clip)
        info.update(used="fd" if err <= fd_check else "flat", fd_relative_error=err, fd_check=fd_check)
    return info


def agreed_unroll(infos: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One mode for all the processes of a run, from each one's :func:`choose_unroll`: theirs where they
    agree, else ``flat`` (exact, memory-flat: safe wherever naive did not fit or fd was off), with
    each process's choice kept under ``per_process``."""
    used = [i["used"] for i in infos]
    if len(set(used)) == 1:
        return dict(infos[0])
    return {**infos[0], "used": "flat", "per_process": used}


def fd_relative_error(
    student: Student,
    theta0: Sequence[Any],
    target: Sequence[Any],
    alpha: Any,
    syn: Any,
    batches: Sequence[Any],
    fd_eps: float | None = None,
    clip: float | None = None,
) -> float:
    """fd's self-check: ||g_fd - g_exact|| / ||g_exact|| for the gradient of L_distill in (D_syn, alpha) on
    one draw, the exact one from ``flat``, both unrolls with the same dropout masks."""
    state = _rng_state(student.device)
    grads = []
    for mode in ("flat", "fd"):
        a = alpha.detach().clone().requires_grad_(True)
        s = syn.detach().clone().requires_grad_(True)
        with _replayed_rng(state, student.device):
            theta_n = unroll(mode, student, theta0, a, s, batches, fd_eps, clip)
            g_syn, g_alpha = torch.autograd.grad(matching_loss(theta_n, target, theta0), [s, a])
        grads.append(torch.cat([g_syn.flatten(), g_alpha.flatten()]).double())
    student.steps.clear()
    return float((grads[1] - grads[0]).norm() / grads[0].norm().clamp(min=1e-30))
