"""LBFGS's curvature history as one rank keeps it: its slices of the pairs, and their global Gram matrices.

torch's two-loop recursion (torch/optim/lbfgs.py) takes 2m dot products in sequence, each with a
vector the previous step changed. Each of them expands into dot products between history vectors
and the gradient g (torch starts from q = -g):

    loop 1, q = -g - sum_{j>i} al_j y_j:            s_i.q = -s_i.g - sum_{j>i} al_j (s_i.y_j)
    loop 2, r = H q + sum_{j<i} (al_j - be_j) s_j:  y_i.r = H (-y_i.g - sum_j al_j y_i.y_j)
                                                            + sum_{j<i} (al_j - be_j) s_j.y_i

So with the Gram matrices SY[i, j] = s_i.y_j and YY[i, j] = y_i.y_j and the products S^T g, Y^T g
known globally, the recursion is scalar work, and the direction is a linear combination

    d = -H g - H sum_j al_j y_j + sum_i (al_i - be_i) s_i

that every rank forms on its own slices. The Gram matrices change by one row and column per new
pair, so one all-reduce per iteration brings everything: the new pair's products with the history
and the gradient's products with all pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def two_loop(
    sy: Tensor, yy: Tensor, sg: Tensor, yg: Tensor, ro: Tensor, h_diag: Tensor | float
) -> tuple[Tensor, Tensor, Tensor]:
    """torch's two-loop recursion on Gram matrices (the module's docstring): returns ``al`` (torch's
    state of that name) and the coefficients of each y_j and each s_i in the direction (g's is -h_diag).

    ``sy``, ``yy``: m x m; ``sg``, ``yg``, ``ro``: m; pairs oldest first, as in torch's lists.
    """
    m = ro.numel()
    al = ro.new_zeros(m)
    for i in range(m - 1, -1, -1):
        al[i] = ro[i] * (-sg[i] - (al[i + 1 :] * sy[i, i + 1 :]).sum())
    yq = -yg - yy @ al  # y_i . q after loop 1, before the scaling by h_diag
    step = ro.new_zeros(m)  # al_i - be_i: the coefficient of s_i
    for i in range(m):
        be = ro[i] * (h_diag * yq[i] + (step[:i] * sy[:i, i]).sum())
        step[i] = al[i] - be
    return al, -h_diag * al, step


class History:
    """This rank's slices of the pairs (y: torch's ``old_dirs``, s: ``old_stps``, oldest first), their
    ``ro`` = 1 / (y.s), and the global Gram matrices SY and YY of all of them.

    The lists are the optimizer state's own (torch's state_dict format shows them); the Gram
    matrices live on the CPU, where the scalar recursion runs, in the vectors' dtype.
    """

    def __init__(self, dirs: list[Tensor], stps: list[Tensor], ro: list[Tensor], dtype: torch.dtype) -> None:
        self.dirs, self.stps, self.ro = dirs, stps, ro
        m = len(dirs)
        self.sy = torch.zeros(m, m, dtype=dtype)
        self.yy = torch.zeros(m, m, dtype=dtype)

    def gram_partials(self) -> Tensor:
        """This rank's partial sums of SY and YY (flattened): a loaded history's Gram matrices."""
        m = len(self.dirs)
        if m == 0:
            return torch.zeros(0, dtype=self.sy.dtype)
        stps, dirs = torch.stack(self.stps), torch.stack(self.dirs)
        return torch.cat([(stps @ dirs.T).reshape(-1), (dirs @ dirs.T).reshape(-1)])

    def set_gram(self, sums: Tensor) -> None:
        """Take the global sums of ``gram_partials()``."""
        m = len(self.dirs)
        self.sy = sums[: m * m].reshape(m, m).to(self.sy.dtype)
        self.yy = sums[m * m :].reshape(m, m).to(self.yy.dtype)

    def partials(self, y: Tensor, s: Tensor, g: Tensor) -> Tensor:
        """This rank's partial sums of every dot product the next direction needs, given the new pair
        (y, s) and the gradient g: y.s, y.y, Y^T s, S^T y, Y^T y, S^T g, Y^T g, s.g, y.g."""
        dots = [y.dot(s), y.dot(y)]
        dots += [v.dot(s) for v in self.dirs] + [v.dot(y) for v in self.stps] + [v.dot(y) for v in self.dirs]
        dots += [v.dot(g) for v in self.stps] + [v.dot(g) for v in self.dirs] + [s.dot(g), y.dot(g)]
        return torch.stack(dots)

    def update(self, y: Tensor, s: Tensor, sums: Tensor, history_size: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Keep the pair (y, s) if y.s > 1e-10, dropping the oldest when full, as torch does. ``sums``:
        the global sums of ``partials(y, s, g)``. Returns S^T g and Y^T g of the history after the
        update, and the new H_diag = y.s / y.y if the pair was kept (None: H_diag stays)."""
        m = len(self.dirs)
        sums = sums.to(self.sy.dtype)
        ys, yy = sums[0], sums[1]
        ys_col, sy_col, yy_col, sg, yg, sg_new, yg_new = sums[2:].split([m, m, m, m, m, 1, 1])
        if not ys > 1e-10:
            return sg, yg, None
        drop = 1 if m == history_size else 0
        if drop:  # shift history by one (limited-memory)
            self.dirs.pop(0)
            self.stps.pop(0)
            self.ro.pop(0)
        self.dirs.append(y)
        self.stps.append(s)
        self.ro.append((1.0 / ys).to(y.device))
        # new row: s_new.y_j (= y_j.s); new column: s_i.y_new
        self.sy = torch.cat([torch.cat([self.sy, sy_col[:, None]], 1), torch.cat([ys_col, ys[None]])[None]])
        self.yy = torch.cat([torch.cat([self.yy, yy_col[:, None]], 1), torch.cat([yy_col, yy[None]])[None]])
        self.sy, self.yy = self.sy[drop:, drop:], self.yy[drop:, drop:]
        sg, yg = torch.cat([sg, sg_new])[drop:], torch.cat([yg, yg_new])[drop:]
        return sg, yg, (ys / yy).to(y.device)

    def direction(self, g: Tensor, h_diag: Tensor | float, y_coefficients: Tensor, s_coefficients: Tensor) -> Tensor:
        """This rank's slice of d = -h_diag g + sum_j c_j y_j + sum_i c'_i s_i."""
        d = g.mul(h_diag).neg_()
        for y, c in zip(self.dirs, y_coefficients.tolist()):
            d.add_(y, alpha=c)
        for s, c in zip(self.stps, s_coefficients.tolist()):
            d.add_(s, alpha=c)
        return d

    def nbytes(self) -> int:
        """The Gram matrices' bytes (the slices are the optimizer state's)."""
        return (self.sy.numel() + self.yy.numel()) * self.sy.element_size()
