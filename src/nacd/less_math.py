"""LESS's pure math (:mod:`nacd.less` is the stage): the seeded random projections of gradient
features (Gaussian, or a sparse Johnson-Lindenstrauss transform), generated block by block and never
held as a dense matrix; the Adam update direction of a gradient; row normalization; the matching of
corpus features to target subtasks (``less/data_selection/matching.py`` of the LESS code).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: Rows (gradient coordinates) per generated block of the projection; part of its definition.
PROJ_BLOCK_ROWS = 1024


def block_seed(seed: int, k: int) -> int:
    """The generator seed of block ``k`` of the projection with seed ``seed``: 32 bits (torch's CPU
    generator keeps only the low 32 bits of a seed), distinct for distinct ``k < 2**32``."""
    return (seed * 0x9E3779B1 + k) % 2**32


class GaussianProjection:
    """``x -> x @ R`` for a ``[n, dim]`` matrix ``R`` of iid ``N(0, 1/dim)`` entries, never held in full.

    Rows ``[k * block_rows, (k + 1) * block_rows)`` of ``R`` are drawn by a generator seeded with
    :func:`block_seed` ``(seed, k)`` on the device's type, so ``R`` depends only on (seed, dim, block_rows,
    device type): not on ``n`` (a prefix of the coordinates keeps its rows), not on how the
    coordinates or the examples are chunked, and not on the process. ``E[<xR, yR>] = <x, y>``
    (Johnson-Lindenstrauss: the error has standard deviation at most ``sqrt(2 / dim) |x| |y|``).
    """

    def __init__(self, n: int, dim: int, seed: int, device: Any = "cpu", block_rows: int = PROJ_BLOCK_ROWS):
        import torch

        if n <= 0 or dim <= 0 or block_rows <= 0 or seed < 0:
            raise ValueError(f"GaussianProjection: bad n={n}, dim={dim}, seed={seed}, block_rows={block_rows}")
        self.n, self.dim, self.seed, self.block_rows = n, dim, seed, block_rows
        self.device = torch.device(device)
        self._cache: tuple[int, Any] | None = None

    def describe(self) -> dict[str, Any]:
        """What defines the matrix (for manifests)."""
        return {
            "kind": "gaussian",
            "dim": self.dim,
            "seed": self.seed,
            "block_rows": self.block_rows,
            "device": self.device.type,
        }

    def block(self, k: int) -> Any:
        """Rows ``[k * block_rows, (k + 1) * block_rows)`` of ``R`` (float32; the last block is not cut)."""
        import torch

        if self._cache is not None and self._cache[0] == k:
            return self._cache[1]
        gen = torch.Generator(device=self.device).manual_seed(block_seed(self.seed, k))
        rows = torch.randn(self.block_rows, self.dim, generator=gen, device=self.device, dtype=torch.float32)
        rows.mul_(1.0 / math.sqrt(self.dim))
        self._cache = (k, rows)
        return rows

    def rows(self, start: int, stop: int) -> Any:
        """Rows ``[start, stop)`` of ``R``, assembled from the blocks they fall in."""
        import torch

        b = self.block_rows
        parts = []
        for k in range(start // b, (stop - 1) // b + 1):
            lo, hi = max(start, k * b), min(stop, (k + 1) * b)
            parts.append(self.block(k)[lo - k * b : hi - k * b])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __call__(self, x: Any, chunk_rows: int | None = None) -> Any:
        """Project ``x`` (``[m, n]``) to ``[m, dim]`` in ``x``'s dtype, ``chunk_rows`` coordinates at a time."""
        if x.shape[-1] != self.n:
            raise ValueError(f"GaussianProjection: input has {x.shape[-1]} coordinates, expected {self.n}")
        chunk = chunk_rows or self.block_rows
        out = x.new_zeros(*x.shape[:-1], self.dim)
        for start in range(0, self.n, chunk):
            stop = min(self.n, start + chunk)
            out += x[..., start:stop] @ self.rows(start, stop).to(x.device, x.dtype)
        return out


class SparseProjection:
    """``x -> x @ R`` for a sparse ``[n, dim]`` matrix ``R`` (a sparse Johnson-Lindenstrauss transform,
    Kane & Nelson 2014): each coordinate ``j`` (row of ``R``) has ``nnz`` entries ``+-1/sqrt(nnz)`` in
    columns drawn uniformly (with replacement), with independent random signs.

    ``E[<xR, yR>] = <x, y>`` and, for vectors whose mass is spread over many coordinates (as
    gradients of many parameters are), the error's spread is that of a Gaussian projection,
    ``~ sqrt(2 / dim) |x| |y|``. It costs ``nnz`` multiply-adds per coordinate instead of ``dim``, and
    its definition (columns and signs, ``nnz`` int64 + sign per coordinate) is drawn block by block
    from the seed exactly as :class:`GaussianProjection`'s rows are: independent of ``n``, of the
    chunking and of the process. On SmolLM2-135M (460,800 LoRA coordinates -> 8192) projecting a
    shard takes well under a second where the Gaussian one takes about 50 s on 2 CPU cores.
    """

    def __init__(
        self, n: int, dim: int, seed: int, device: Any = "cpu", block_rows: int = PROJ_BLOCK_ROWS, nnz: int = 4
    ):
        import torch

        if n <= 0 or dim <= 0 or block_rows <= 0 or seed < 0 or nnz <= 0:
            raise ValueError(f"SparseProjection: bad n={n}, dim={dim}, seed={seed}, block_rows={block_rows}, nnz={nnz}")
        self.n, self.dim, self.seed, self.block_rows, self.nnz = n, dim, seed, block_rows, nnz
        self.device = torch.device(device)
        self._cols: Any = None

    def describe(self) -> dict[str, Any]:
        """What defines the matrix (for manifests)."""
        return {"kind": "sparse", "dim": self.dim, "seed": self.seed, "block_rows": self.block_rows, "nnz": self.nnz}

    def block(self, k: int) -> tuple[Any, Any]:
        """(columns ``[block_rows, nnz]`` int64, signed values ``[block_rows, nnz]`` float32) of block ``k``."""
        import torch

        gen = torch.Generator().manual_seed(block_seed(self.seed, k))  # on CPU: the same on every device
        cols = torch.randint(self.dim, (self.block_rows, self.nnz), generator=gen)
        signs = torch.randint(2, (self.block_rows, self.nnz), generator=gen).float().mul_(2).sub_(1)
        return cols, signs.div_(math.sqrt(self.nnz))

    def _columns(self) -> tuple[Any, Any]:
        """Columns and values of all ``n`` coordinates (``n * nnz`` of each: 15 MB for 460,800 x 4)."""
        import torch

        if self._cols is None:
            parts = [self.block(k) for k in range((self.n - 1) // self.block_rows + 1)]
            cols = torch.cat([c for c, _ in parts])[: self.n].to(self.device)
            vals = torch.cat([v for _, v in parts])[: self.n].to(self.device)
            self._cols = (cols, vals)
        return self._cols

    def dense(self) -> Any:
        """``R`` in full (``[n, dim]`` float32): for tests on small ``n``."""
        import torch

        cols, vals = self._columns()
        r = torch.zeros(self.n, self.dim, device=cols.device)
        r.index_put_((torch.arange(self.n, device=cols.device)[:, None].expand_as(cols), cols), vals, accumulate=True)
        return r

    def __call__(self, x: Any, chunk_rows: int | None = None) -> Any:
        """Project ``x`` (``[m, n]``) to ``[m, dim]`` in ``x``'s dtype, ``chunk_rows`` coordinates at a time."""
        if x.shape[-1] != self.n:
            raise ValueError(f"SparseProjection: input has {x.shape[-1]} coordinates, expected {self.n}")
        cols, vals = self._columns()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.n)
        out = x2.new_zeros(x2.shape[0], self.dim)
        chunk = chunk_rows or 65536
        for start in range(0, self.n, chunk):
            stop = min(self.n, start + chunk)
            c = cols[start:stop].to(x.device)
            v = vals[start:stop].to(x.device, x.dtype)
            contrib = x2[:, start:stop, None] * v  # [m, chunk, nnz]
            out.index_add_(1, c.reshape(-1), contrib.reshape(x2.shape[0], -1))
        return out.reshape(*lead, self.dim)


def make_projection(kind: str, n: int, dim: int, seed: int, device: Any = "cpu", nnz: int = 4) -> Any:
    """The projection of ``select.less.projection``: ``sparse`` (default) or ``gaussian``."""
    if kind == "sparse":
        return SparseProjection(n, dim, seed, device, nnz=nnz)
    if kind == "gaussian":
        return GaussianProjection(n, dim, seed, device)
    raise ValueError(f"select.less.projection={kind!r}: expected sparse or gaussian")


@dataclass
class AdamMoments:
    """Adam's state at a warm-up checkpoint, flattened in the order of :func:`~nacd.lora.lora_parameters`."""

    exp_avg: Any  # m_t, [n]
    exp_avg_sq: Any  # v_t, [n]
    step: int  # t: updates done
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def to(self, device: Any) -> AdamMoments:
        return AdamMoments(
            self.exp_avg.to(device), self.exp_avg_sq.to(device), self.step, self.beta1, self.beta2, self.eps
        )


def adam_direction(grads: Any, moments: AdamMoments) -> Any:
    """The direction of the Adam update that gradient(s) ``grads`` (``[..., n]``) would make next.

    With the checkpoint's moments ``m_t, v_t`` after ``t`` updates (the paper's Adam influence)::

        m = b1 m_t + (1 - b1) g          v = b2 v_t + (1 - b2) g^2
        direction = (m / (1 - b1^(t+1))) / (sqrt(v / (1 - b2^(t+1))) + eps)

    exactly the step ``torch.optim.AdamW`` would take (divided by -lr, no weight decay). Up to a
    positive factor this is ``m / (sqrt(v) + eps * sqrt(1 - b2^(t+1)))``; the LESS code computes
    ``m / sqrt(v + eps)`` (no bias correction), so after L2 normalization the two differ only in
    where eps enters.
    """
    t = moments.step + 1
    b1, b2 = moments.beta1, moments.beta2
    m = b1 * moments.exp_avg + (1 - b1) * grads
    v = b2 * moments.exp_avg_sq + (1 - b2) * grads * grads
    return (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + moments.eps)


def normalize_rows(x: Any) -> Any:
    """Each row divided by its L2 norm (zero rows stay zero)."""
    import torch.nn.functional as F

    return F.normalize(x, dim=-1)


def subtask_means(target_features: Any, subtasks: Sequence[str]) -> tuple[list[str], Any]:
    """The sorted subtask names and the mean target feature of each (``[K, dim]``)."""
    import torch

    names = sorted(set(subtasks))
    index = {s: i for i, s in enumerate(names)}
    rows = torch.tensor([index[s] for s in subtasks])
    sums = target_features.new_zeros(len(names), target_features.shape[-1]).index_add_(0, rows, target_features)
    counts = torch.bincount(rows, minlength=len(names)).to(sums)
    return names, sums / counts[:, None]


def less_match(train_features: Sequence[Any], target_means: Sequence[Any], lrs: Sequence[float]) -> Any:
    """LESS scores ``max_s sum_c w_c <f_c(x), mean_{z in s} t_c(z)>`` with ``w_c = lr_c / sum lr``.

    ``train_features[c]``: ``[N, dim]`` normalized features of the corpus at checkpoint ``c``;
    ``target_means[c]``: ``[K, dim]`` per-subtask means of the normalized target features
    (:func:`subtask_means`); ``lrs[c]``: the checkpoint's average warm-up lr. Returns ``[N]``.
    """
    if not (len(train_features) == len(target_means) == len(lrs) > 0):
        raise ValueError("less_match: one train block, one target block and one lr per checkpoint")
    total = float(sum(lrs))
    if not total > 0:
        raise ValueError(f"less_match: the checkpoint lrs {list(lrs)} must sum to a positive number")
    score = 0
    for feats, means, lr in zip(train_features, target_means, lrs, strict=True):
        score = score + (lr / total) * (feats.float() @ means.float().T)
    return score.max(dim=-1).values
