"""What was done to an output image since the copy produced it, estimated as a linear filter.

JPEG, resizing, blur and colour jitter each change an image mostly as a filter would: a 5x5 kernel per
pair of colour channels plus an offset, `T`. Fitted by least squares from the master's output to the
observed image (the mark is too weak and too unlike the content to bend the fit), it is removed from
the comparison: the residual is `observed - T(master)`, and the mark is looked for as `T` would have
changed it (the reader projects on `T`'s adjoint of the residual). Without it, what a blur takes from
the content itself outweighed the mark, the same way on every image (BENCHMARKS.md, *Marks in output
images*: blur radius 1 read at z 2.4-3.0 from 4 to 16 images, where the bound needs 5.4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIZE = 5  # kernel side (3 and 9 read the same within 0.05 of correlation per bit)
RIDGE = 1e-6  # relative, keeps the fit defined on flat images


def fit(ref: torch.Tensor, observed: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel (C, C, SIZE, SIZE) and offset (C,) of the filter that best maps `ref` to `observed`
    on the pixels of `mask` (C x H x W images)."""
    c = ref.shape[0]
    cols = F.unfold(ref[None].double(), SIZE, padding=SIZE // 2)[0].T  # pixels x (C * SIZE^2)
    keep = interior(mask)[0].flatten() > 0
    a = torch.cat([cols[keep], torch.ones(int(keep.sum()), 1, dtype=torch.float64)], 1)
    b = observed.double().flatten(1).T[keep]  # pixels x C
    gram = a.T @ a
    gram += RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=torch.float64)
    sol = torch.linalg.solve(gram, a.T @ b)  # (C * SIZE^2 + 1) x C
    kernel = sol[:-1].T.reshape(c, c, SIZE, SIZE)
    return kernel.float(), sol[-1].float()


def apply(kernel: torch.Tensor, offset: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x[None], kernel, offset, padding=SIZE // 2)[0]


def adjoint(kernel: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """T's linear part transposed, applied to `r`: <T(p), r> = <p, adjoint(r)> for every image p."""
    return F.conv_transpose2d(r[None], kernel, padding=SIZE // 2)[0]


def interior(mask: torch.Tensor) -> torch.Tensor:
    """The mask less SIZE // 2 pixels at its edges, where the filter would read outside the image."""
    return -F.max_pool2d(-mask[None], SIZE, stride=1, padding=SIZE // 2)[0]
