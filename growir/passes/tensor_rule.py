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


@dataclass
class TensorRule:
    source: str  # state_dict name of the tensor this one is made from
    axes: list = field(default_factory=list)  # AxisMap per axis
    scale: float = 1.0
    zero: bool = False  # a new block's residual writer (identity depth growth)
    notes: list = field(default_factory=list)  # human-readable reasons (compensations applied)
    overrides: list = field(default_factory=list)  # (axis, new positions, tensor) from other sources (AKI)

    def new_shape(self, old_shape) -> tuple:
        return tuple(len(m.index) if m.index is not None else s for m, s in zip(self.axes, old_shape))

    def apply(self, old: torch.Tensor) -> torch.Tensor:
        new = old.detach()
        for axis, m in enumerate(self.axes):
            if m.index is not None:
                new = new.index_select(axis, m.index)
            if m.divide is not None:
                counts = m.divide if m.index is None else m.divide[m.index]
                shape = [1] * new.dim()
                shape[axis] = -1
                new = new / counts.to(new.dtype).reshape(shape)
        if self.scale != 1.0:
            new = new * self.scale
        if self.zero:
            new = torch.zeros_like(new)
        return new.clone().contiguous()

    @property
    def changes(self) -> bool:
        return self.zero or self.scale != 1.0 or any(m.index is not None or m.divide is not None for m in self.axes)
