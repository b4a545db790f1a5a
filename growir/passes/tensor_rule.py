"""A per-tensor rewrite: gather along axes, divide consumer axes by copy counts, scale, zero.

A rule needs nothing but its own source tensor, so checkpoints larger than memory can be streamed
through the same rules one tensor at a time.

    new[j0, j1, ...] = scale * old[g0(j0), g1(j1), ...] / prod_k c_k(g_k(j_k))   (over consumer axes k)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AxisMap:
    """``index``: new position -> old position (None: axis unchanged). ``divide``: per old position, the
    number to divide by on a consumer axis (the copy count), or None on a producer axis."""
    index: torch.Tensor | None = None
    divide: torch.Tensor | None = None
    fill: str | None = None  # at index -1: "zero", or "mean" (the mean of the old entries along the axis)


@dataclass
class TensorRule:
    source: str  # state_dict name of the tensor this one is made from
    axes: list = field(default_factory=list)  # AxisMap per axis
    scale: float = 1.0
    zero: bool = False  # a new block's residual writer (identity depth growth)
    notes: list = field(default_factory=list)  # human-readable reasons (compensations applied)
    donor: str | None = None  # AKI: a second source whose (identically mapped) values fill the new units
    donor_axis: tuple | None = None  # (axis, bool mask over new positions) taken from the donor
    noise: tuple | None = None  # (std relative to the tensor's std, seed): cancels over copies, see apply

    def new_shape(self, old_shape) -> tuple:
        return tuple(len(m.index) if m.index is not None else s for m, s in zip(self.axes, old_shape))

    def apply(self, old: torch.Tensor, donor: torch.Tensor | None = None) -> torch.Tensor:
        new = self._mapped(old)
        if self.donor_axis is not None and donor is not None:
            axis, mask = self.donor_axis
            index = [slice(None)] * new.dim()
            index[axis] = mask
            new[tuple(index)] = self._mapped(donor)[tuple(index)]
        if self.noise is not None:
            new = new + self._cancelling_noise(new)
        return new

    def _cancelling_noise(self, new: torch.Tensor) -> torch.Tensor:
        """Noise on a consumer axis whose copies sum to zero: sum_k (W/c + e_k) x = W x when sum_k e_k = 0.
        The copies' inputs are equal, so the function is unchanged, but their gradients now differ."""
        std, seed = self.noise
        axis = next(i for i, m in enumerate(self.axes) if m.divide is not None and m.index is not None)
        g = self.axes[axis].index
        gen = torch.Generator().manual_seed(seed)
        eps = torch.randn(new.shape, generator=gen, dtype=new.dtype) * std * float(new.std() if new.numel() > 1 else 0)
        eps = eps.movedim(axis, 0)
        sums = torch.zeros((int(g.max()) + 1,) + eps.shape[1:], dtype=eps.dtype).index_add_(0, g, eps)
        counts = torch.bincount(g).to(eps.dtype).reshape((-1,) + (1,) * (eps.dim() - 1))
        eps = eps - (sums / counts)[g]  # singletons get exactly zero
        return eps.movedim(0, axis)

    def has_copies_to_perturb(self) -> bool:
        return any(m.divide is not None and m.index is not None and len(m.index) > len(m.divide) for m in self.axes)

    def _mapped(self, old: torch.Tensor) -> torch.Tensor:
        new = old.detach()
        for axis, m in enumerate(self.axes):
            mean = new.mean(axis, keepdim=True) if m.fill == "mean" else None
            if m.index is not None:
                new = new.index_select(axis, m.index.clamp(min=0))
            if m.divide is not None:
                counts = m.divide if m.index is None else m.divide[m.index.clamp(min=0)]
                shape = [1] * new.dim()
                shape[axis] = -1
                new = new / counts.to(new.dtype).reshape(shape)
            if m.fill is not None:
                where = [slice(None)] * new.dim()
                where[axis] = m.index < 0
                new[tuple(where)] = 0.0 if mean is None else mean.expand_as(new)[tuple(where)]
        if self.scale != 1.0:
            new = new * self.scale
        if self.zero:
            new = torch.zeros_like(new)
        return new.clone().contiguous()

    @property
    def changes(self) -> bool:
        return self.zero or self.scale != 1.0 or any(m.index is not None or m.divide is not None for m in self.axes)
