"""FS^4's context-aware embedding (CAE) module: a feature map refined by its neighbours in space and colour.

Sec. 4.3 of [0]. For pixels i, j of the feature map f with positions p and raw colours I:

- s_ij = f_i . f_j / (|f_i| |f_j|), the cosine similarity of the CNN features;
- k_ij = w1 k1_ij + w2 k2_ij                                              (Eq. 7)
- k1_ij = exp(-|p_i - p_j|^2 / (2 t1^2) - |I_i - I_j|^2 / (2 t2^2))       (Eq. 8)
- k2_ij = exp(-|p_i - p_j|^2 / (2 t3^2))                                  (Eq. 9)
- P_ij = s_ij k_ij, and F_i = h(f_i) + sum_j P_ij f_j, h a 1x1 convolution.

w = (w1, w2) and t = (t1, t2, t3) are learnt. The paper prints the refinement as
``sum_j P_ij f_i``; that is a typo (it would only rescale f_i), and this module sums ``P_ij f_j``.

Resolution (Sec. 5.1 of [0]): the feature map and the raw image are downsampled (area averaging)
to 1/16 of the image resolution, where the relation map is computed; the context term is then
upsampled (bilinear) to 1/8 and added to the projector output h(f), which is computed from the
feature map resized to 1/8. (The paper says the refined map is upsampled "to match the projector
output which is a linear process on the FPN feature"; h is that projector.) With equal strides
the module is exactly the formula above.

Choices where the paper is silent (all keyword arguments of :class:`ContextAwareEmbedding`):

- Positivity: every learnt parameter is ``softplus(raw) + floor`` (floor 1e-4), so it stays
  positive whatever the optimiser does; the floor keeps t away from 0 in float32.
- Units: positions are cell centres divided by the longer side of the 1/16 grid (in [0, 1)),
  so t1 and t3 are fractions of the image; colours are whatever the caller passes (the default
  t2 assumes RGB in [0, 1], not ImageNet-normalised values).
- Initial values (none in the paper): w = (1, 1); t = (0.25, 0.1, 0.05), in the spirit of dense
  CRF defaults [1] (a wide colour-position kernel and a narrow position one, one 1/16 cell at
  320 pixels).
- The sum over j is unnormalised, as written; ``average=True`` divides it by the number of
  pixels N (not in the paper) so its scale does not change with the image size.

Memory: the relation map is N x N for N = (H/16)(W/16) pixels (400 at 320 x 320). It is never
materialised: :func:`context_aggregate` computes it in chunks of query rows, each about
:data:`MAPS_PER_CHUNK` x B x rows x N values, with ``rows`` chosen from a byte budget
(``chunk_bytes``, default 64 MiB; :func:`rows_per_chunk`). With ``checkpoint=True`` (the default)
each chunk is recomputed in the backward pass instead of kept, so the whole module needs
O(chunk_bytes + B x N x C) memory in training as well. Example: B = 128, 320 x 320 images, float32:
one row of all pixels is 128 x 400 x 4 B = 200 KiB per map, so the default budget takes 27 rows
per chunk (15 chunks). At B = 1 one row must fit the budget: N <= 64 MiB / (12 x 4 B) = 1.4 M
relation pixels (about a 19,000 x 19,000 image) before a chunk of one row exceeds it.
Measured on CPU (B = 1, N = 4096, C = 8, float32, forward + backward with checkpointing): the peak
grows by 11 maps of one chunk's size (B x rows x N x 4 B) over a fixed ~50 MiB of autograd
overhead: 704 MiB for one chunk of all 4096 rows, 90 MiB for chunks of 512 rows.

References:
    - [0]: FS^4, "Fully Self-Supervised Learning for Semantic Segmentation", 2022, arXiv:2202.11981.
    - [1]: Kraehenbuehl and Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge
      Potentials", NeurIPS 2011.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Floor added to every softplus-parametrised positive parameter.
POSITIVE_FLOOR = 1e-4
#: Budget of one chunk of the relation map, bytes.
DEFAULT_CHUNK_BYTES = 64 * 2**20
#: (B, rows, N) maps alive at once while one chunk is computed with autograd: the colour distance,
#: its per-channel differences, both exponents, k, s, P and their gradients (11 measured, see above).
MAPS_PER_CHUNK = 12


def positive(raw: Tensor, floor: float = POSITIVE_FLOOR) -> Tensor:
    """``softplus(raw) + floor``: the positive parametrisation of w and t."""
    return F.softplus(raw) + floor


def inverse_positive(value: float, floor: float = POSITIVE_FLOOR) -> float:
    """The raw parameter whose :func:`positive` is ``value``.

    Raises:
        ValueError: If ``value <= floor``.
    """
    if value <= floor:
        raise ValueError(f"initial value must exceed {floor}, got {value}")
    y = value - floor
    return y + math.log(-math.expm1(-y))  # log(exp(y) - 1), stable for large y


def grid_positions(
    height: int, width: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Positions p of the cells of an (height, width) grid: (row + 0.5, col + 0.5) / max(height, width).

    Returns:
        (N, 2) tensor, row-major (the order of ``x.flatten(2)``).
    """
    scale = float(max(height, width))
    rows = (torch.arange(height, device=device, dtype=dtype) + 0.5) / scale
    cols = (torch.arange(width, device=device, dtype=dtype) + 0.5) / scale
    grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([grid_r.reshape(-1), grid_c.reshape(-1)], dim=1)


def gaussian_kernels(
    pos_q: Tensor, pos_k: Tensor, col_q: Tensor, col_k: Tensor, omega: Tensor, theta: Tensor
) -> Tensor:
    """The colour-position and position kernels k_ij of Eqs. (7)-(9) of [0] for a block of rows.

    Args:
        pos_q: Positions of the query pixels i, (r, 2).
        pos_k: Positions of all pixels j, (N, 2).
        col_q: Colours of the query pixels, (B, r, 3).
        col_k: Colours of all pixels, (B, N, 3).
        omega: (w1, w2), (2,), positive.
        theta: (t1, t2, t3), (3,), positive.

    Returns:
        k, (B, r, N).
    """
    dp2 = (pos_q[:, None, :] - pos_k[None, :, :]).pow(2).sum(-1)  # (r, N)
    dc2 = torch.zeros(col_q.shape[0], pos_q.shape[0], pos_k.shape[0], dtype=col_q.dtype, device=col_q.device)
    for c in range(col_q.shape[-1]):  # one channel at a time: no (B, r, N, 3) tensor
        dc2 = dc2 + (col_q[:, :, None, c] - col_k[:, None, :, c]).pow(2)
    k1 = torch.exp(-dp2 / (2 * theta[0] ** 2) - dc2 / (2 * theta[1] ** 2))  # Eq. (8)
    k2 = torch.exp(-dp2 / (2 * theta[2] ** 2))  # Eq. (9)
    return omega[0] * k1 + omega[1] * k2  # Eq. (7)


def relation_map(features: Tensor, image: Tensor, omega: Tensor, theta: Tensor, rows: slice | None = None) -> Tensor:
    """The non-local factors P_ij = s_ij k_ij of [0] (Sec. 4.3), for all rows or a slice of them.

    Args:
        features: Feature map f, (B, C, h, w).
        image: Raw colours at the same grid, (B, 3, h, w).
        omega: (2,) positive weights w.
        theta: (3,) positive bandwidths t.
        rows: Query rows i (row-major pixel indices); all N if omitted.

    Returns:
        P, (B, r, N) (r = N when ``rows`` is omitted). This materialises r x N values: use
        :func:`context_aggregate` for the refinement itself.
    """
    unit, pos, col = _flat_inputs(features, image)
    rows = slice(None) if rows is None else rows
    return _relation_rows(unit[:, rows], pos[rows], col[:, rows], unit, pos, col, omega, theta)


def rows_per_chunk(batch: int, num_pixels: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES, element_size: int = 4) -> int:
    """Query rows per chunk so that about :data:`MAPS_PER_CHUNK` (B, rows, N) maps fit ``chunk_bytes``.

    Returns:
        At least 1 and at most ``num_pixels``.
    """
    per_row = MAPS_PER_CHUNK * batch * max(num_pixels, 1) * element_size
    return int(min(max(num_pixels, 1), max(1, chunk_bytes // per_row)))


def context_aggregate(
    features: Tensor,
    image: Tensor,
    omega: Tensor,
    theta: Tensor,
    *,
    chunk_rows: int | None = None,
    checkpoint: bool = False,
    average: bool = False,
) -> Tensor:
    """The context term sum_j P_ij f_j of [0] (Sec. 4.3), computed in chunks of query rows.

    Args:
        features: Feature map f, (B, C, h, w).
        image: Raw colours at the same grid, (B, 3, h, w).
        omega: (2,) positive weights w.
        theta: (3,) positive bandwidths t.
        chunk_rows: Query rows per chunk; all N at once if omitted.
        checkpoint: Recompute each chunk in the backward pass instead of storing it (only when
            autograd is recording).
        average: Divide the sum by N (not in [0]).

    Returns:
        (B, C, h, w), the same for every ``chunk_rows``.

    Raises:
        ValueError: If the grids differ or ``chunk_rows < 1``.
    """
    batch, channels, height, width = features.shape
    if image.shape[0] != batch or image.shape[-2:] != features.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} must be (B, 3, h, w) at the feature grid {tuple(features.shape)}")
    num_pixels = height * width
    step = num_pixels if chunk_rows is None else chunk_rows
    if step < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    unit, pos, col = _flat_inputs(features, image)
    flat = features.flatten(2).transpose(1, 2)  # (B, N, C)
    recompute = checkpoint and torch.is_grad_enabled()
    parts = []
    for start in range(0, num_pixels, step):
        rows = slice(start, min(start + step, num_pixels))
        args = (unit[:, rows], pos[rows], col[:, rows], unit, pos, col, flat, omega, theta)
        parts.append(_RecomputedRows.apply(*args) if recompute else _context_rows(*args))
    context = torch.cat(parts, dim=1)  # (B, N, C)
    if average:
        context = context / num_pixels
    return context.transpose(1, 2).reshape(batch, channels, height, width)


class ContextAwareEmbedding(nn.Module):
    """The CAE module of [0] (Sec. 4.3, Fig. 4): F = h(f) + sum_j P_ij f_j, relations at 1/16, output at 1/8."""

    def __init__(
        self,
        channels: int,
        *,
        relation_stride: int = 16,
        out_stride: int = 8,
        init_omega: tuple[float, float] = (1.0, 1.0),
        init_theta: tuple[float, float, float] = (0.25, 0.1, 0.05),
        average: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        checkpoint: bool = True,
    ) -> None:
        """Build the projector h and the learnt kernel parameters.

        Args:
            channels: Channels C of the feature map (the output has C channels too).
            relation_stride: Image pixels per relation-grid cell (16 in [0]).
            out_stride: Image pixels per output cell (8 in [0]).
            init_omega: Initial (w1, w2) of Eq. (7).
            init_theta: Initial (t1, t2, t3) of Eqs. (8)-(9): t1, t3 in fractions of the image's
                longer side, t2 in the caller's colour units.
            average: Divide the context sum by the number of relation pixels (not in [0]).
            chunk_bytes: Memory budget of one chunk of the relation map.
            checkpoint: Recompute relation chunks in the backward pass (bounded training memory).

        Raises:
            ValueError: On non-positive strides or initial values.
        """
        super().__init__()
        if relation_stride < 1 or out_stride < 1:
            raise ValueError(f"strides must be >= 1, got {relation_stride} and {out_stride}")
        self.relation_stride = relation_stride
        self.out_stride = out_stride
        self.average = average
        self.chunk_bytes = chunk_bytes
        self.checkpoint = checkpoint
        self.h = nn.Conv2d(channels, channels, kernel_size=1)
        self.raw_omega = nn.Parameter(torch.tensor([inverse_positive(v) for v in init_omega]))
        self.raw_theta = nn.Parameter(torch.tensor([inverse_positive(v) for v in init_theta]))

    @property
    def omega(self) -> Tensor:
        """(w1, w2) of Eq. (7), positive."""
        return positive(self.raw_omega)

    @property
    def theta(self) -> Tensor:
        """(t1, t2, t3) of Eqs. (8)-(9), positive."""
        return positive(self.raw_theta)

    @staticmethod
    def grid_size(height: int, width: int, stride: int) -> tuple[int, int]:
        """(max(1, H // stride), max(1, W // stride))."""
        return max(1, height // stride), max(1, width // stride)

    def forward(self, features: Tensor, image: Tensor) -> Tensor:
        """Refine a feature map.

        Args:
            features: Feature map f at any resolution (e.g. the FPN's 1/4), (B, C, h, w).
            image: The raw image, (B, 3, H, W), in the colour units ``init_theta`` assumes.

        Returns:
            F, (B, C, H // out_stride, W // out_stride), in the dtype of h's output (the relations
            are computed in float32 or wider, outside autocast).
        """
        height, width = image.shape[-2:]
        relation_size = self.grid_size(height, width, self.relation_stride)
        out_size = self.grid_size(height, width, self.out_stride)
        # The Gaussian exponents need float32 at least: relations run outside autocast.
        work = torch.promote_types(features.dtype, torch.float32)
        small = _resize(features.to(work), relation_size)
        colours = _resize(image.to(work), relation_size)
        rows = rows_per_chunk(features.shape[0], relation_size[0] * relation_size[1], self.chunk_bytes,
                              small.element_size())
        with torch.autocast(features.device.type, enabled=False):
            context = context_aggregate(small, colours, self.omega.to(work), self.theta.to(work),
                                        chunk_rows=rows, checkpoint=self.checkpoint, average=self.average)
        projected = self.h(_resize(features, out_size))
        return projected + _resize(context, out_size).to(projected.dtype)


def _flat_inputs(features: Tensor, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # Unit-norm features (B, N, C), positions (N, 2) and colours (B, N, 3) of a grid.
    height, width = features.shape[-2:]
    unit = F.normalize(features.flatten(2).transpose(1, 2), dim=-1)
    pos = grid_positions(height, width, device=features.device, dtype=features.dtype)
    col = image.flatten(2).transpose(1, 2).to(features.dtype)
    return unit, pos, col


def _relation_rows(unit_q: Tensor, pos_q: Tensor, col_q: Tensor, unit: Tensor, pos: Tensor, col: Tensor,
                   omega: Tensor, theta: Tensor) -> Tensor:
    cosine = unit_q @ unit.transpose(1, 2)  # s_ij, (B, r, N)
    return cosine * gaussian_kernels(pos_q, pos, col_q, col, omega, theta)


def _context_rows(unit_q: Tensor, pos_q: Tensor, col_q: Tensor, unit: Tensor, pos: Tensor, col: Tensor, flat: Tensor,
                  omega: Tensor, theta: Tensor) -> Tensor:
    return _relation_rows(unit_q, pos_q, col_q, unit, pos, col, omega, theta) @ flat  # (B, r, C)


class _RecomputedRows(torch.autograd.Function):
    """:func:`_context_rows` whose (B, r, N) intermediates are recomputed in the backward pass.

    Activation checkpointing for one chunk. Written out instead of ``torch.utils.checkpoint``,
    whose first call imports ``torch._dynamo`` (seconds); the chunk is deterministic, so no RNG
    state is restored. First-order gradients only.
    """

    @staticmethod
    def forward(ctx, *args: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(*args)
        with torch.no_grad():
            return _context_rows(*args)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        wanted = [t for t in inputs if t.requires_grad]
        with torch.enable_grad():
            grads = iter(torch.autograd.grad(_context_rows(*inputs), wanted, grad_out, allow_unused=True))
        return tuple(next(grads) if t.requires_grad else None for t in inputs)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    # Area averaging when shrinking (the paper's "downsample"), bilinear when growing.
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
