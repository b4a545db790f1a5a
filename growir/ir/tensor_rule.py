"""A per-tensor rewrite: gather along axes, divide consumer axes by copy counts, scale, zero.

A rule needs nothing but its own source tensor, so checkpoints larger than memory can be streamed
through the same rules one tensor at a time.

    new[j0, j1, ...] = scale * old[g0(j0), g1(j1), ...] * prod_a s_a(g_a(j_a)) / prod_k c_k(g_k(j_k))

(for a weight the graph reads as ``offset + w``, the scale applies to that sum: offset + new = scale·(offset + ...)).

over consumer axes k (copy counts c) and axes a with per-position factors s (a fused projection's query rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .gathers import gather, gather_axes, gather_fill, put_at
from .shares import exact_shares, split_factors

SLICE_BYTES = 32 << 20  # the float32 transient of a low-precision tensor's rule, at most (about)


@dataclass
class AxisMap:
    """``index``: new position -> old position (None: axis unchanged). ``divide``: per old position, the
    number to divide by on a consumer axis (the copy count), or None on a producer axis."""
    index: torch.Tensor | None = None
    divide: torch.Tensor | None = None
    fill: str | None = None  # at index -1: "zero", "mean" (of the old entries along the axis), "copy" (the
    # old entry at ``source``; zero where source is -1), "geometric" (a 1-D table extended along the
    # geometric sequence it holds, as rotary frequencies are; copies if it holds none), or "random" (normal
    # draws at the source tensor's std, seeded by the rule's ``fill_seed``: fresh units), or "weighted" (the
    # mean of the old entries weighted by the rule's ``donor``, one weight per old position: a writer whose output
    # a per-channel scale multiplies, ``sum_i l_i W_i / sum_i l_i``; the plain mean where the weights sum to 0)
    source: torch.Tensor | None = None  # "copy"/"geometric": per new position, the old position to copy
    scale: torch.Tensor | None = None  # per old position: a factor on some entries only (a fused QKV's query)
    split: tuple | None = None  # consumer axis: (lo, hi) bounds of random weights that replace 1/count, per
    # element, summing to 1 over each old position's copies (seeded by ``fill_seed``; see ``split_factors``)

    def scale_rows(self, rows: torch.Tensor, factor: float, size: int) -> None:
        """Multiply the entries at old positions ``rows`` by ``factor``."""
        if self.scale is None:
            self.scale = torch.ones(size, dtype=torch.float64)
        self.scale[rows] *= factor


@dataclass
class TensorRule:
    """How one grown tensor is made from a source tensor: an ``AxisMap`` per axis (copy, divide, scale, fill),
    a whole-tensor scale, and the notes that say why; ``apply`` computes it.

    >>> import torch
    >>> rule = TensorRule("w", [AxisMap(index=torch.tensor([0, 1, 0])), AxisMap()])
    >>> rule.new_shape((2, 5)), rule.apply(torch.eye(2)[:, :1]).flatten().tolist()
    ((3, 5), [1.0, 0.0, 1.0])
    """
    source: str  # state_dict name of the tensor this one is made from
    axes: list = field(default_factory=list)  # AxisMap per axis
    scale: float = 1.0
    zero: bool = False  # a new block's residual writer (identity depth growth)
    notes: list = field(default_factory=list)  # human-readable reasons (compensations applied)
    donor: str | None = None  # AKI: a second source whose (identically mapped) values fill the new units; with
    # a "weighted" fill, the tensor of its weights (without ``donor_axis``)
    donor_axis: tuple | None = None  # (axis, bool mask over new positions) taken from the donor
    noise: tuple | None = None  # (std relative to the tensor's std, seed): cancels over copies, see apply
    offset: float = 0.0  # the graph reads ``offset + w`` (a (1+w) norm weight): ``scale`` applies to that sum
    fill_seed: int = 0  # seeds the "random" fills (one draw per tensor and axis)

    def new_shape(self, old_shape) -> tuple:
        """The grown tensor's shape, from the source's."""
        return tuple(len(m.index) if m.index is not None else s for m, s in zip(self.axes, old_shape))

    def apply(self, old: torch.Tensor, donor: torch.Tensor | None = None, store: torch.dtype | None = None
              ) -> torch.Tensor:
        """The grown tensor, on ``old``'s device and in its dtype. Arithmetic runs in float32 (float64 stays
        float64) and is cast once at the end, so a bfloat16 weight divided by its copy count is the
        float32 quotient rounded once; integer tensors are only gathered.

        >>> rule = TensorRule("w", [AxisMap(torch.tensor([0, 1, 0]), torch.tensor([2, 1]))])
        >>> rule.apply(torch.tensor([1.0, 3.0], dtype=torch.bfloat16))
        tensor([0.5000, 3.0000, 0.5000], dtype=torch.bfloat16)
        """
        return self.apply_checked(old, donor, store)[0]

    def apply_checked(self, old: torch.Tensor, donor: torch.Tensor | None = None,
                      store: torch.dtype | None = None) -> tuple[torch.Tensor, bool]:
        """``apply`` and whether casting back to ``old.dtype`` rounded a value: then the grown tensor is the
        exact one only up to that rounding (a bfloat16 weight divided by 3, say), and so is the growth.
        ``store``: the dtype the caller will store the result in when not ``old.dtype`` (random fills are drawn
        in it)."""
        if self.arithmetic and store in (None, old.dtype) and exact_in_own_dtype(self, old):
            new = self._mapped(old.detach())
            return (new.clone() if new.data_ptr() == old.data_ptr() else new).contiguous(), False
        axis = self._slice_axis(old)
        if axis is not None:  # no random fill there: ``store`` changes nothing
            return self._sliced(old, axis)
        compute = _compute_dtype(old) if self.arithmetic else old.dtype
        weights = donor if self.donor_axis is None else None  # a "weighted" fill's weights
        wide = self._mapped(old.detach().to(compute), store or old.dtype, weights)
        if self.donor_axis is not None and donor is not None:
            axis, mask = self.donor_axis
            shape = [1] * wide.dim()
            shape[axis] = -1
            taken = self._mapped(donor.detach().to(compute), store or donor.dtype)
            wide = torch.where(mask.to(wide.device).reshape(shape), taken, wide)
        if self.noise is not None and not wide.is_meta:
            wide = wide + self._cancelling_noise(wide).to(wide.device)
        if wide.data_ptr() == old.data_ptr() and not wide.is_meta:  # an unchanged tensor: never share storage
            wide = wide.clone()
        if not old.is_floating_point() or wide.dtype == old.dtype:
            return wide.contiguous(), False
        new = wide.to(old.dtype).contiguous()
        return new, rounds(new, wide)

    def _slice_axis(self, old: torch.Tensor) -> int | None:
        """An axis along which a large low-precision tensor is computed a slice at a time, so the float32
        transient is one slice, not the tensor (the head of a 32000-token vocabulary). Only where every step
        is elementwise along it (gathers, divisions, scales, zero or copy fills on other axes), so slices give
        the same bits as the whole: no noise, donor, mean, random or geometric fill (they read the whole)."""
        if (old.is_meta or not old.is_floating_point() or _compute_dtype(old) == old.dtype or not self.arithmetic
                or old.numel() * 4 <= SLICE_BYTES or self.noise is not None or self.donor_axis is not None
                or any(m.fill in ("mean", "weighted", "random", "geometric") or m.split is not None
                       for m in self.axes)):
            return None
        plain = [a for a, m in enumerate(self.axes) if m.index is None and m.divide is None and m.scale is None
                 and old.shape[a] > 1]
        return max(plain, key=lambda a: old.shape[a], default=None) if len(self.axes) == old.dim() else None

    def _sliced(self, old: torch.Tensor, axis: int) -> tuple[torch.Tensor, bool]:
        out = torch.empty(self.new_shape(old.shape), dtype=old.dtype, device=old.device)
        step = max(1, old.shape[axis] * SLICE_BYTES // (4 * out.numel()))
        lossy = False
        for start in range(0, old.shape[axis], step):
            n = min(step, old.shape[axis] - start)
            part, rounded = self.apply_checked(old.narrow(axis, start, n))
            out.narrow(axis, start, n).copy_(part)
            lossy = lossy or rounded
        return out, lossy

    @property
    def arithmetic(self) -> bool:
        """Whether values are computed, not only gathered or zeroed (then they are computed in float32)."""
        return (self.scale != 1.0 or self.noise is not None
                or any(m.divide is not None or m.split is not None or m.scale is not None
                       or m.fill in ("mean", "weighted", "geometric") for m in self.axes))

    def _cancelling_noise(self, new: torch.Tensor) -> torch.Tensor:
        """Noise on a consumer axis whose copies sum to zero: sum_k (W/c + e_k) x = W x when sum_k e_k = 0.
        The copies' inputs are equal, so the function is unchanged, but their gradients now differ."""
        std, seed = self.noise
        axis = next(i for i, m in enumerate(self.axes) if m.divide is not None and m.index is not None)
        g = self.axes[axis].index
        gen = torch.Generator().manual_seed(seed)
        eps = torch.randn(new.shape, generator=gen, dtype=new.dtype) * std * float(new.std() if new.numel() > 1 else 0)
        eps = eps.movedim(axis, 0)
        live = g >= 0  # fill positions (repeat-and-fill, rotary zeros) get no noise: some must stay zero
        eps[~live] = 0.0
        g = g.clamp(min=0)
        sums = torch.zeros((int(g.max()) + 1,) + eps.shape[1:], dtype=eps.dtype).index_add_(0, g, eps)
        counts = torch.bincount(g[live], minlength=len(sums)).clamp(min=1).to(eps.dtype)
        eps = eps - (sums / counts.reshape((-1,) + (1,) * (eps.dim() - 1)))[g]  # singletons get exactly zero
        eps[~live] = 0.0
        return eps.movedim(0, axis)

    def _random_fill(self, new: torch.Tensor, axis: int, at: torch.Tensor, std: float, store: torch.dtype) -> None:
        """Normal draws at ``std`` written into ``new`` at the positions ``at`` of ``axis``, in place, seeded per
        tensor and axis: drawn in float32 at the fill's own shape (not the tensor's), and rounded to the stored
        dtype ``store`` first: any value will do there, so none should count as a rounding."""
        shape = list(new.shape)
        shape[axis] = len(at)
        put_at(new, axis, at, self._draw(shape, axis, std, store))

    def _draw(self, shape: list, axis: int, std: float, store: torch.dtype) -> torch.Tensor:
        """The normal draws of ``axis``'s fill at ``shape`` (see ``_random_fill``)."""
        gen = torch.Generator().manual_seed(self.fill_seed * 31 + axis)
        if math.prod(shape) >= 16:  # torch's vectorized normal_ computes round(z * std): randn's z, times std
            draw = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
        else:  # the scalar path draws in double: z * std rounded once would differ from randn's z times std
            draw = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(std)
        if store.is_floating_point and torch.finfo(store).eps > torch.finfo(torch.float32).eps:
            draw = draw.to(store)
        return draw

    def has_copies_to_perturb(self) -> bool:
        """Whether an axis holds copies that divide a read (so noise added to them can cancel over the copies)."""
        return any(m.divide is not None and m.index is not None and len(m.index) > len(m.divide)
                   and m.split is None for m in self.axes)

    def _mapped(self, old: torch.Tensor, store: torch.dtype | None = None, weights=None) -> torch.Tensor:
        stepwise = any(m.fill or m.split is not None for m in self.axes)  # they read the values around them
        if not stepwise:
            return self._copies(old)
        new = self._filled_blocks(old, store)
        return self._stepwise(old, store, weights) if new is None else new

    def _filled_blocks(self, old: torch.Tensor, store: torch.dtype | None = None) -> torch.Tensor | None:
        """``_stepwise`` where it only copies and fills with zeros or draws (fresh units), as one pass of
        block copies into the grown tensor: the same draws (shape, seed), the same bits, without a tensor per
        axis (None elsewhere: means, copies, divisions, splits read what earlier steps made)."""
        if (not old.is_floating_point() or self.offset or self.zero
                or any(m.fill not in (None, "zero", "random") or m.split is not None
                       or (m.divide is not None and not _ones(m.divide)) or (m.scale is not None and not _ones(m.scale))
                       for m in self.axes)):
            return None
        if old.is_meta:  # shapes only: nothing to draw
            return torch.empty(self.new_shape(old.shape), dtype=old.dtype, device=old.device)
        shape, fills, std = list(old.shape), [], None
        for axis, m in enumerate(self.axes):
            if m.index is not None:
                shape[axis] = len(m.index)
            if m.fill == "random":
                std = _own_std(old) if std is None else std
                at = int((m.index < 0).sum())
                fills.append(self._draw([*shape[:axis], at, *shape[axis + 1:]], axis, std, store or old.dtype))
            else:
                fills.append(None)
        return gather_fill(old, [m.index for m in self.axes], fills, self.scale)

    def _stepwise(self, old: torch.Tensor, store: torch.dtype | None = None, weights=None) -> torch.Tensor:
        """Axis by axis: gather, divide (or split), scale, fill."""
        new, on = old, (lambda t: t.to(old.device))  # index tables live on the CPU: move them to the tensor
        std = None
        for axis, m in enumerate(self.axes):
            weighted = weights if m.fill == "weighted" else None
            mean = _mean(new, axis, weighted) if m.fill in ("mean", "weighted") else None
            index = m.index
            if m.fill in ("copy", "geometric"):
                index = torch.where(m.index >= 0, m.index, m.source)  # filled from an old entry, no history
            if index is not None:
                geometric = _geometric(new, index, m) if m.fill == "geometric" else None
                # positions at -1 hold zeros until filled; a fill writes all of them, so they need none then
                before, new = new, gather(new, axis, index, zero_holes=m.fill is None)
            shape = [1] * new.dim()
            shape[axis] = -1
            if m.divide is not None and m.split is not None and index is not None:
                factors = split_factors(new.shape, axis, index, m.split, self.fill_seed * 31 + axis + 7, new.dtype)
                new = exact_shares(before, new.mul_(on(factors)), factors, axis, on(index))
            elif m.divide is not None and not _ones(m.divide):  # x / 1 is x: no pass over the tensor
                counts = on(m.divide if index is None else m.divide[index.clamp(min=0)]).to(new.dtype)
                new = new.div_(counts.reshape(shape)) if new is not old else new / counts.reshape(shape)
            if m.scale is not None and not _ones(m.scale):
                factor = on(m.scale if index is None else m.scale[index.clamp(min=0)]).to(new.dtype)
                new = new.mul_(factor.reshape(shape)) if new is not old else new * factor.reshape(shape)
            if m.fill is not None:  # written in place into the fill positions only (``new`` was gathered)
                at = (index < 0).nonzero().flatten()
                if m.fill == "random":
                    std = _own_std(old) if std is None else std
                    self._random_fill(new, axis, at, std, store or old.dtype)
                elif mean is not None:
                    put_at(new, axis, at, mean.expand_as(new).index_select(axis, on(at)))
                else:
                    put_at(new, axis, at, None)
                if m.fill == "geometric" and geometric is not None:
                    new = geometric.to(new.device)
        new = self._scaled(new, old)
        return torch.zeros_like(new) if self.zero else new

    def _copies(self, old: torch.Tensor) -> torch.Tensor:
        """``_mapped`` without fills: every value of the grown tensor is an old value divided and scaled per old
        position, so the arithmetic runs on the old tensor first (fewer values, the same operations in the same
        order, so the same bits) and the gathers of all axes follow as one pass of block copies."""
        new, on = old, (lambda t: t.to(old.device))
        for axis, m in enumerate(self.axes):
            shape = [1] * new.dim()
            shape[axis] = -1
            for per_old, op, op_ in ((m.divide, torch.div, torch.Tensor.div_), (m.scale, torch.mul, torch.Tensor.mul_)):
                if per_old is not None and not _ones(per_old):
                    factor = on(per_old).to(new.dtype).reshape(shape)
                    new = op_(new, factor) if new is not old else op(new, factor)
        if self.zero:
            return torch.zeros(self.new_shape(old.shape), dtype=old.dtype, device=old.device)
        return gather_axes(self._scaled(new, old), [m.index for m in self.axes])

    def _scaled(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """``new`` times the tensor's whole scale (in place unless ``new`` is still the source tensor)."""
        if self.scale != 1.0 and self.offset:  # (offset + w') = scale * (offset + w)
            return (new + self.offset) * self.scale - self.offset
        if self.scale != 1.0:
            return new.mul_(self.scale) if new is not old else new * self.scale
        return new


def _mean(t: torch.Tensor, axis: int, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``t`` along ``axis``, weighted by ``weights`` where they fit and do not cancel (``cancels``:
    then no weighted mean exists, the plain one is taken, and the planner names that, ``layer_scale.py``).

    >>> _mean(torch.tensor([[1.0, 3.0]]), 1, torch.tensor([3.0, 1.0])).tolist()
    [[1.5]]
    """
    if weights is None or weights.numel() != t.shape[axis] or cancels(weights):
        return t.mean(axis, keepdim=True)
    shape = [1] * t.dim()
    shape[axis] = -1
    w = weights.detach().to(device=t.device, dtype=t.dtype).reshape(shape)
    return (t * w).sum(axis, keepdim=True) / w.sum()


def cancels(weights: torch.Tensor) -> bool:
    """Whether ``weights`` sum to zero, up to float32 rounding of their magnitudes: a mean weighted by them, Σ w_i x_i
    / Σ w_i, has no value (or one dominated by rounding), so a "weighted" fill cannot be computed.

    >>> cancels(torch.tensor([1.0, -1.0])), cancels(torch.tensor([0.5, 0.25]))
    (True, False)
    """
    w = weights.detach().double()
    return not w.numel() or float(w.sum().abs()) <= 1e-6 * float(w.abs().sum())


def exact_in_own_dtype(rule: TensorRule, old: torch.Tensor) -> bool:
    """Whether a low-precision tensor's rule can compute in the tensor's own dtype with the bits of float32 then
    one cast, and no rounding: only copies, divisions and scales by powers of two (a x2 growth's copy counts),
    zero fills and random fills (drawn rounded to the dtype already), and no old value leaving the dtype's
    normal range at any step. Each float32 step is then exact, so the one rounding to the dtype is the
    identity, as is each step in the dtype. No float32 transient, no check. (A random draw would have to be
    below 1e-37 times the weights' std to reach the subnormal range: not checked.)

    >>> r = TensorRule("w", [AxisMap(torch.tensor([0, 1, 0, 1]), torch.tensor([2, 2]))])
    >>> exact_in_own_dtype(r, torch.ones(2, dtype=torch.bfloat16)), exact_in_own_dtype(r, torch.ones(2))
    (True, False)
    """
    if (old.is_meta or not old.is_floating_point() or _compute_dtype(old) == old.dtype or rule.noise is not None
            or rule.donor_axis is not None or rule.offset or rule.zero or not _power_of_two(rule.scale)
            or any(m.fill not in (None, "zero", "copy", "random") or m.split is not None for m in rule.axes)):
        return False
    lo = hi = low = high = 1.0  # the running factor's range, and its extremes over every step
    for m in rule.axes:
        for per_old, divides in ((m.divide, True), (m.scale, False)):
            if per_old is None:
                continue
            f = per_old.double().abs()
            if not all(_power_of_two(v) for v in {float(f.min()), float(f.max())}) or not bool(
                    (torch.frexp(f).mantissa == 0.5).all()):
                return False
            lo, hi = (lo / float(f.max()), hi / float(f.min())) if divides else (lo * float(f.min()), hi * float(f.max()))
            low, high = min(low, lo), max(high, hi)
    low, high = min(low, lo * abs(rule.scale)), max(high, hi * abs(rule.scale))
    smallest, largest = magnitudes(old)
    info = torch.finfo(old.dtype)
    return not smallest < info.tiny / low and largest * high <= info.max


def magnitudes(t: torch.Tensor) -> tuple[float, float]:
    """(smallest nonzero |t|, largest |t|) of a one- or two-byte float tensor (inf where every value is zero),
    read from the bits: with the sign bit cleared, a larger magnitude has a larger bit pattern, so integer
    min and max find both, vectorized (6x faster than comparing bfloat16 values, which streaming paid once
    per tensor: 2 of its 10 CPU s for a 0.85B model). NaN is not expected (checkpoints are checked finite).

    >>> magnitudes(torch.tensor([0.0, -3.0, 2.0**-130, 0.5], dtype=torch.bfloat16))
    (7.346839692639297e-40, 3.0)
    """
    bits = {1: torch.int8, 2: torch.int16}[t.element_size()]
    mask = (1 << (8 * t.element_size() - 1)) - 1  # every bit but the sign
    b = t.detach().reshape(-1).view(bits) & mask
    largest = int(b.max()) if b.numel() else 0
    if largest == 0:
        return float("inf"), 0.0
    smallest = int(b.sub_(1).bitwise_and_(mask).min()) + 1  # zeros became the largest pattern, the rest b - 1
    value = lambda pattern: float(torch.tensor([pattern], dtype=bits).view(t.dtype).float())  # noqa: E731
    return value(smallest), value(largest)


def _ones(per_old: torch.Tensor) -> bool:
    """Every factor is one: dividing or multiplying by them changes no bit (x / 1 and x * 1 are x, NaN included),
    so the pass over the tensor is skipped (a fresh group's old units appear once: every count is one)."""
    return bool((per_old == 1).all())


def _power_of_two(x: float) -> bool:
    return x != 0 and math.frexp(abs(x))[0] == 0.5


def _own_std(t: torch.Tensor) -> float:
    """The std "random" fills draw at: the source tensor's own (none on the meta device, where nothing is drawn)."""
    return float(t.float().std()) if t.numel() > 1 and not t.is_meta else 0.0


def _geometric(old: torch.Tensor, index: torch.Tensor, m: AxisMap) -> torch.Tensor | None:
    """A 1-D positive geometric sequence old[j] = a·r^j at new positions i: a·r^(i/k) for k = new/old, so that
    old entry j lands at k·j (``interleave_index``) and the entries between continue the sequence. None when
    ``old`` is not such a sequence (copies are used then)."""
    if old.is_meta or old.dim() != 1 or len(old) < 2 or not bool((old > 0).all()) or len(m.index) % len(old):
        return None
    logs = old.double().log()
    steps = logs[1:] - logs[:-1]
    if not torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-4, atol=1e-6):
        return None
    k = len(m.index) // len(old)
    if not torch.equal(m.index[::k], torch.arange(len(old))):
        return None
    i = torch.arange(len(m.index), dtype=torch.float64)
    return (logs[0].cpu() + steps.mean().cpu() * i / k).exp().to(old.dtype)


def rounding_reason(names: list, state: dict) -> str:
    """Why a growth whose grown values had to be rounded into the source's dtype is not exact."""
    dtypes = sorted({str(state[n].dtype).replace("torch.", "") for n in names})
    return (f"{'/'.join(dtypes)} cannot hold the grown values of {len(names)} tensors exactly (e.g. `{names[0]}`: "
            f"a division by a copy count, a scale or noise that is not exact in that dtype); they were computed "
            f"in float32 and rounded once, and the deviation measured is that rounding")


def rounds(new: torch.Tensor, wide: torch.Tensor) -> bool:
    """Whether ``new`` (``wide`` cast to a narrower dtype) lost a value in the cast."""
    return not new.is_meta and not _equal_in(wide.dtype, new, wide)


def _equal_in(dtype: torch.dtype, new: torch.Tensor, wide: torch.Tensor, rows: int = 1 << 20) -> bool:
    """``new`` upcast to ``dtype`` equals ``wide``, compared a slice at a time (no full-size upcast copy)."""
    a, b = new.reshape(-1), wide.reshape(-1)
    return all(torch.equal(a[i:i + rows].to(dtype), b[i:i + rows]) for i in range(0, a.numel(), rows))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for floating tensors, float64 kept; other dtypes are only gathered, in their own dtype."""
    return (torch.float64 if t.dtype == torch.float64 else torch.float32) if t.is_floating_point() else t.dtype
