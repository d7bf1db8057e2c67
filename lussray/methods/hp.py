"""HP [0]: contrastive learning with global and local hidden positives on frozen features.

Notation of [0]: f_i frozen (task-agnostic) feature of patch i, s_i code of the segmentation head
S, s'_i code of the momentum head S', z_i = normalize(Z(s_i)) the projection.

**Reference pools** (:class:`ReferencePools`, section 3.2). Q^ag holds M frozen features and Q^sp
M momentum-head codes, one random patch per image, L2-normalised. Q^ag is filled once and then
fixed; Q^sp is renewed every ``renew_interval`` steps (:func:`should_renew`,
:meth:`ReferencePools.renew_`). Both are persistent buffers: a resume restores them.

**Global hidden positives** (:func:`hidden_positive_masks`, eqs. (2)-(4)). The per-anchor
threshold is ``c_i = max_m cos(q_m, f_i)``; j is a positive of i if ``cos(f_i, f_j) > c_i`` **or**
``> c_j`` (symmetrised), self excluded. The same rule on s' with Q^sp gives the task-specific set.
The positive weights are ``w_ij = [j in P^ag_i] + lambda [j in P^sp_i]``, with lambda 0 up to
``warmup`` steps and then rising linearly to 1 (:func:`hidden_positive_lambda`).

**Local hidden positives** (:func:`local_positive_weights`, :func:`propagate_local`, eqs. (7)-(9)).
The last-block attention scores of the frozen ViT (head mean, pre-softmax; the cosine affinity
for a ResNet, ``lussray.models.vit``) are clamped per row to their [10 %, 90 %] quantiles,
softmaxed over all patches, scaled by sigma (28) and zeroed below the row mean; within the 3x3
neighbourhood (self included) they weight the codes: ``s^mix_i = sum_j t_ij s_j / |I^surr_i|``.

**Loss** (:func:`hidden_positive_loss`, eqs. (5), (6), (10), (11)). Image by image, the 784 (h*w)
anchors are contrasted against all N = B*h*w patches of the batch with temperature tau:
``-(tau / 0.07) sum_j w_ij log p_ij / sum_j w_ij``, where the softmax denominator keeps only the
task-agnostic positives plus a random fraction rho of all other patches (self never). Anchors
without a task-agnostic positive are dropped; with ``reweighting`` each anchor is weighted by its
total positive weight divided by the mean over the image's kept anchors. The same is computed for
z^mix (contrasted against all z^mix). The total is ``(sum over images of both terms) / (2 B)``.
The step adds ``alpha * mean_i ||z_i - z^aug_i||`` (the consistency term R of eq. (11)) and the
probe losses of ``lussray.methods.stego``.

Deviations from the reference code (``hynnsk/HP``), each deliberate:

- Pools are fed from the training stream itself: after every step one random patch per image of
  that batch enters Q^ag (until it is full) and a staging ring of M momentum codes; a renewal
  copies the ring into Q^sp. The reference renews from pool_size / batch_size fresh batches of a
  second loader (32 extra ViT forwards per renewal on COCO); here the entries are at most
  ceil(M / B) steps old and cost nothing. Until Q^ag is first full the HP terms are 0 (only the
  probes learn), ceil(M / global batch) steps, since ``gather_distributed`` pools the entries of
  all workers (every worker then holds the same pools).
- Renewal counts global steps (``step % renew_interval == 0``, step > 0); the reference counts
  iterations within the epoch, so it skips the renewal at each epoch start.
- Thresholds, masks and logits are computed in float32; the reference's matmuls run in fp16
  under autocast, which flips a few comparisons near the threshold.
- The random kept-negative mask is drawn per image, on the device; the reference draws one
  (784, N) mask per step on the CPU and reuses it for every image (the same per-anchor fraction
  rho either way).
- Each image's loss terms are recomputed in the backward pass (activation checkpointing), a
  memory saving with identical values.
- An image none of whose anchors has a task-agnostic positive adds 0 (the reference's mean over
  an empty set is NaN).
- The paper's eq. (11) writes separate terms for P^ag and P^sp with their own negative sets
  N^ag, N^sp; the reference (``loss_version`` 1, followed here) merges them into one weighted
  positive mask with the P^ag-based denominator.
- The momentum update runs in ``after_backward`` (after the step's forward, before the optimiser
  step), the same order as the reference's update at the end of its forward.

References:
    - [0]: HP, "Leveraging Hidden Positives for Unsupervised Semantic Segmentation", CVPR 2023.
    - [1]: SupCon, "Supervised Contrastive Learning", NeurIPS 2020 (the base temperature 0.07).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from lussray.methods.stego import probe_losses, unwrap
from lussray.models.stego_head import HPHeads, flatten_patches

#: SupCon's base temperature: the loss is scaled by tau / BASE_TEMPERATURE.
BASE_TEMPERATURE = 0.07

#: The 3x3 neighbourhood (self included) as (dy, dx), raster order; index 4 is the patch itself.
NEIGHBOUR_OFFSETS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def hidden_positive_lambda(step: int, warmup: int, total_steps: int) -> float:
    """lambda of eq. (11): 0 while ``step <= warmup``, then ``(step - warmup) / (total - warmup)``, at most 1.

    Args:
        step: 0-based index of the current step (the reference's ``trainingiter``).
        warmup: Steps before task-specific positives count (1000 COCO, 50 Cityscapes, 100 Potsdam).
        total_steps: Steps of the whole run (the reference's ``maxiter``).

    Returns:
        lambda in [0, 1].
    """
    if step <= warmup or total_steps <= warmup:
        return 0.0
    return min(1.0, (step - warmup) / (total_steps - warmup))


def should_renew(step: int, renew_interval: int) -> bool:
    """Whether Q^sp is renewed before ``step`` (every ``renew_interval`` steps, never at step 0)."""
    return renew_interval > 0 and step > 0 and step % renew_interval == 0


def sample_patches(maps: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """One random patch per image, L2-normalised: (B, C, h, w) -> (B, C)."""
    batch, _, height, width = maps.shape
    where = generator.device if generator is not None else "cpu"  # a generator draws on its own device
    index = torch.randint(height * width, (batch,), generator=generator, device=where).to(maps.device)
    picked = maps.flatten(2)[torch.arange(batch, device=maps.device), :, index]
    return F.normalize(picked.float(), dim=1)


def gather_rows(rows: Tensor, enabled: bool) -> Tensor:
    """``rows`` of every worker concatenated in rank order (``rows`` itself without a process group)."""
    if not (enabled and dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, rows.contiguous())
    return torch.cat(gathered)


class ReferencePools(nn.Module):
    """The task-agnostic pool Q^ag, the task-specific pool Q^sp and the staging ring that renews it.

    All state is in persistent buffers (``state_dict`` restores it on resume).

    Attributes:
        agnostic: Q^ag, (M, C) unit rows; valid once ``num_agnostic == M``.
        specific: Q^sp, (M, D) unit rows.
        staging: The last M momentum codes pushed, (M, D), ring order.
        num_agnostic: Rows of Q^ag filled (0..M), int64 scalar.
        num_staged: Codes ever pushed to the ring, int64 scalar.
    """

    def __init__(self, pool_size: int, feat_dim: int, code_dim: int) -> None:
        """Allocate empty pools.

        Args:
            pool_size: M (2048 COCO/Cityscapes, 1024 Potsdam).
            feat_dim: Frozen feature channels C.
            code_dim: Code dimension D.

        Raises:
            ValueError: If ``pool_size`` is not positive.
        """
        super().__init__()
        if pool_size <= 0:
            raise ValueError(f"pool_size must be positive, got {pool_size}")
        self.pool_size = pool_size
        self.register_buffer("agnostic", torch.zeros(pool_size, feat_dim))
        self.register_buffer("specific", torch.zeros(pool_size, code_dim))
        self.register_buffer("staging", torch.zeros(pool_size, code_dim))
        self.register_buffer("num_agnostic", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_staged", torch.zeros((), dtype=torch.long))

    @property
    def ready(self) -> bool:
        """True once Q^ag (and with it the first Q^sp) is full."""
        return int(self.num_agnostic) >= self.pool_size

    @torch.no_grad()
    def push_(self, features: Tensor, codes: Tensor) -> None:
        """Add unit rows: frozen features to Q^ag while it is not full, momentum codes to the ring.

        When Q^ag becomes full, Q^sp is set from the ring, so both start from the same images
        (the reference's ``initialize_reference_pool``).

        Args:
            features: (n, C) unit frozen features (one patch per image).
            codes: (n, D) unit momentum-head codes of the same patches.
        """
        was_ready = self.ready
        filled = int(self.num_agnostic)
        take = min(self.pool_size - filled, features.shape[0])
        if take > 0:
            self.agnostic[filled : filled + take] = features[:take].to(self.agnostic)
            self.num_agnostic += take
        start = int(self.num_staged)
        slots = (torch.arange(codes.shape[0], device=self.staging.device) + start) % self.pool_size
        rows = codes[-self.pool_size :].to(self.staging)
        self.staging[slots[-self.pool_size :]] = rows
        self.num_staged += codes.shape[0]
        if self.ready and not was_ready:
            self.renew_()

    @torch.no_grad()
    def renew_(self) -> None:
        """Q^sp <- the staging ring (the last M momentum codes pushed)."""
        self.specific.copy_(self.staging)


def hidden_positive_masks(sim: Tensor, thresholds_rows: Tensor, thresholds_cols: Tensor, self_index: Tensor) -> Tensor:
    """Eq. (3)/(4): ``sim_ij > c_i or sim_ij > c_j``, self excluded.

    Args:
        sim: (P, N) cosines between P anchors and all N patches.
        thresholds_rows: (P,) c of the anchors.
        thresholds_cols: (N,) c of all patches.
        self_index: (P,) column of each anchor in ``sim``.

    Returns:
        (P, N) bool.
    """
    mask = (sim > thresholds_rows[:, None]) | (sim > thresholds_cols[None, :])
    mask[torch.arange(sim.shape[0], device=sim.device), self_index] = False
    return mask


def keep_at_random(shape: tuple[int, int], rho: float, *, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> Tensor:
    """Bernoulli(rho) bool mask: which patches enter a denominator besides the positives.

    Args:
        shape: (P, N).
        rho: Keep probability (0.02; 1 keeps all, 0 none).
        device: Where to draw (the generator, if given, must live there).
        generator: Random source, or None for the global one.

    Returns:
        (P, N) bool.
    """
    return torch.rand(shape, device=device, generator=generator) < rho


def denominator_mask(positives: Tensor, random_keep: Tensor, self_index: Tensor) -> Tensor:
    """Which patches enter an anchor's softmax denominator: its P^ag, the random ones, never itself.

    Args:
        positives: (P, N) bool task-agnostic positives of P anchors.
        random_keep: (P, N) bool from :func:`keep_at_random`.
        self_index: (P,) column of each anchor.

    Returns:
        (P, N) bool.
    """
    kept = positives | random_keep
    kept[torch.arange(positives.shape[0], device=positives.device), self_index] = False
    return kept


def pool_thresholds(x: Tensor, pool: Tensor) -> Tensor:
    """Eq. (2): ``c_i = max_m cos(q_m, x_i)`` for unit rows ``x`` (N, C) and ``pool`` (M, C)."""
    return (x @ pool.t()).max(dim=1).values


def _supcon_rows(z_rows: Tensor, z_all: Tensor, weights: Tensor, kept: Tensor, tau: float,
                 reweighting: bool) -> Tensor:
    """Mean over anchors of the weighted SupCon term for one image (anchors already filtered)."""
    logits = z_rows @ z_all.t() / tau
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_prob = logits - torch.log((torch.exp(logits) * kept).sum(dim=1, keepdim=True))
    total = weights.sum(dim=1)
    mean_log_prob = (weights * log_prob).sum(dim=1) / total
    scale = total / total.mean() if reweighting else torch.ones_like(total)
    return -((tau / BASE_TEMPERATURE) * mean_log_prob * scale).mean()


def _image_loss(rows: slice, z: Tensor, z_mix: Tensor | None, features: Tensor, codes_ema: Tensor, c_ag: Tensor,
                c_sp: Tensor, random_keep: Tensor, lam: float, tau: float, reweighting: bool) -> tuple[Tensor, Tensor]:
    """Both SupCon terms of one image's anchors and ``[#P^ag, #P^sp, #anchors]`` of its kept anchors.

    The masks are rebuilt from the (small) inputs, so under :func:`torch.utils.checkpoint.checkpoint`
    only ``random_keep`` of size (P, N) is kept per image for the backward pass.
    """
    self_index = torch.arange(rows.start, rows.stop, device=z.device)
    with torch.no_grad():
        p_ag = hidden_positive_masks(features[rows] @ features.t(), c_ag[rows], c_ag, self_index)
        p_sp = hidden_positive_masks(codes_ema[rows] @ codes_ema.t(), c_sp[rows], c_sp, self_index)
        anchors = p_ag.any(dim=1)
        kept = denominator_mask(p_ag, random_keep, self_index)[anchors].float()
        weights = (p_ag.float() + lam * p_sp.float())[anchors]
        counts = torch.stack([p_ag[anchors].sum(), p_sp[anchors].sum(), anchors.sum()]).float()
    if not bool(anchors.any()):
        return z[rows].sum() * 0.0, counts
    loss = _supcon_rows(z[rows][anchors], z, weights, kept, tau, reweighting)
    if z_mix is not None:
        loss = loss + _supcon_rows(z_mix[rows][anchors], z_mix, weights, kept, tau, reweighting)
    return loss, counts


def hidden_positive_loss(
    z: Tensor,
    z_mix: Tensor | None,
    features: Tensor,
    codes_ema: Tensor,
    pool_agnostic: Tensor,
    pool_specific: Tensor,
    *,
    patches_per_image: int,
    lam: float,
    tau: float,
    rho: float,
    reweighting: bool = True,
    generator: torch.Generator | None = None,
    checkpoint: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GHP + LHP contrastive loss of eqs. (5)-(11) of [0] (reference ``SupConLoss``, loss_version 1).

    Memory: the (P, N) similarity matrices of one image exist at a time; with ``checkpoint`` each
    image's terms are recomputed in the backward pass, so only a (P, N) bool mask per image is
    kept (B = 64, P = 784: 2.5 GB instead of about 40 GB of float32 activations).

    Args:
        z: (N, D) unit projections, N = B * P, image-major.
        z_mix: (N, D) unit projections of the LHP-mixed codes, or None (no LHP term).
        features: (N, C) unit frozen features (for P^ag).
        codes_ema: (N, D) unit momentum-head codes (for P^sp).
        pool_agnostic: Q^ag, (M, C) unit rows.
        pool_specific: Q^sp, (M, D) unit rows.
        patches_per_image: P = h * w.
        lam: lambda (:func:`hidden_positive_lambda`).
        tau: Temperature (0.8 COCO, 0.6 Cityscapes, 0.4 Potsdam).
        rho: Fraction of the non-positive patches kept in the denominator (0.02; 1.0 Potsdam).
        reweighting: Weight anchors by their total positive weight over the image mean.
        generator: Random source of the kept-negative masks, on the device of ``z``; None: global.
        checkpoint: Recompute each image's terms in the backward pass (activation checkpointing).

    Returns:
        ``(loss, stats)``: the scalar and detached ``positives_agnostic`` / ``positives_specific``
        (mean positives per kept anchor) and ``kept_anchors`` (fraction of all anchors).

    Raises:
        ValueError: If N is not a multiple of ``patches_per_image``.
    """
    n = z.shape[0]
    if n % patches_per_image:
        raise ValueError(f"{n} patches are not a whole number of images of {patches_per_image}")
    images = n // patches_per_image
    with torch.autocast(z.device.type, enabled=False):
        z, features, codes_ema = z.float(), features.float(), codes_ema.float()
        z_mix = z_mix.float() if z_mix is not None else None
        with torch.no_grad():
            c_ag = pool_thresholds(features, pool_agnostic.float())
            c_sp = pool_thresholds(codes_ema, pool_specific.float())
        loss = z.new_zeros(())
        counts = torch.zeros(3, device=z.device)
        for b in range(images):
            rows = slice(b * patches_per_image, (b + 1) * patches_per_image)
            random_keep = keep_at_random((patches_per_image, n), rho, device=z.device, generator=generator)
            args = (rows, z, z_mix, features, codes_ema, c_ag, c_sp, random_keep, lam, tau, reweighting)
            if checkpoint and torch.is_grad_enabled():
                image_loss, image_counts = torch.utils.checkpoint.checkpoint(_image_loss, *args, use_reentrant=False)
            else:
                image_loss, image_counts = _image_loss(*args)
            loss = loss + image_loss
            counts += image_counts
    anchors_total = counts[2].clamp(min=1)
    stats = {"positives_agnostic": counts[0] / anchors_total, "positives_specific": counts[1] / anchors_total,
             "kept_anchors": counts[2] / n}
    return loss / (images * 2), stats


def _neighbour_index(height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For every patch and 3x3 offset: the neighbour's raster index (clamped) and whether it exists."""
    y, x = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    ys = torch.stack([y + dy for dy, _ in NEIGHBOUR_OFFSETS])  # (9, h, w)
    xs = torch.stack([x + dx for _, dx in NEIGHBOUR_OFFSETS])
    valid = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
    index = ys.clamp(0, height - 1) * width + xs.clamp(0, width - 1)
    return index.flatten(1), valid.flatten(1)  # (9, h*w)


@torch.no_grad()
def local_positive_weights(
    affinity: Tensor, height: int, width: int, *, sigma: float = 28.0, low_quantile: float = 0.1,
    high_quantile: float = 0.9,
) -> Tensor:
    """The LHP weights of eqs. (7)-(9): processed attention restricted to the 3x3 neighbourhood.

    Per anchor row of ``affinity``: clamp to the row's [low, high] quantiles, softmax over all
    patches, multiply by sigma, zero the entries below the row mean (eq. (7)); then keep the 9
    neighbours (self included; 0 outside the image) and divide by the number of neighbours inside
    the image (4 at corners, 6 at edges, 9 inside: the reference's ``divide_num``).

    Args:
        affinity: (B, N, N) attention scores, N = height * width, raster order.
        height: h.
        width: w.
        sigma: The scale of eq. (9) (28, the reference's ``self.sigma`` = spatial size at 224).
        low_quantile: Lower clamp quantile (0.1).
        high_quantile: Upper clamp quantile (0.9).

    Returns:
        (B, 9, h, w) weights t_ij / |I^surr_i|, offsets in :data:`NEIGHBOUR_OFFSETS` order.
    """
    batch, n, _ = affinity.shape
    if n != height * width:
        raise ValueError(f"affinity has {n} patches, expected {height} x {width}")
    scores = affinity.float()
    high = torch.quantile(scores, high_quantile, dim=2, keepdim=True)
    low = torch.quantile(scores, low_quantile, dim=2, keepdim=True)
    attention = torch.maximum(torch.minimum(scores, high), low).softmax(dim=2) * sigma
    attention = torch.where(attention < attention.mean(dim=2, keepdim=True), torch.zeros_like(attention), attention)
    index, valid = _neighbour_index(height, width, affinity.device)
    picked = attention.gather(2, index.t()[None].expand(batch, -1, -1))  # (B, N, 9)
    picked = picked * valid.t()[None]
    count = valid.sum(dim=0).to(picked.dtype)  # (N,)
    return (picked / count[None, :, None]).permute(0, 2, 1).reshape(batch, len(NEIGHBOUR_OFFSETS), height, width)


def propagate_local(code: Tensor, weights: Tensor) -> Tensor:
    """Eq. (9): ``s^mix_i = sum over the 3x3 neighbours j of w_ij s_j`` (gradient flows to every s_j).

    Args:
        code: (B, D, h, w) codes s.
        weights: (B, 9, h, w) from :func:`local_positive_weights`.

    Returns:
        (B, D, h, w).
    """
    height, width = code.shape[-2:]
    padded = F.pad(code, (1, 1, 1, 1))
    mixed = torch.zeros_like(code)
    for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
        shifted = padded[:, :, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        mixed = mixed + weights[:, k : k + 1].to(code.dtype) * shifted
    return mixed


def consistency_loss(z: Tensor, z_aug: Tensor) -> Tensor:
    """R of eq. (11): mean Euclidean distance between projections of the two photometric views."""
    return F.pairwise_distance(z.float(), z_aug.float()).mean()


class HPMethod(nn.Module):
    """The HP training step on featurizer outputs, with the reference pools as its state.

    Hooks for the shared loop: :meth:`before_step` (pool renewal), :meth:`training_step`,
    :meth:`after_backward` (gradient clipping, momentum update). ``state_dict()`` holds the pools.

    Attributes:
        pools: :class:`ReferencePools`.
    """

    def __init__(
        self,
        *,
        feat_dim: int,
        dim: int,
        pool_size: int = 2048,
        tau: float = 0.8,
        alpha: float = 0.05,
        rho: float = 0.02,
        ema_m: float = 0.99,
        warmup: int = 1000,
        renew_interval: int = 100,
        reweighting: bool = True,
        sigma: float = 28.0,
        feature_dropout: float = 0.1,
        grad_norm: float = 10.0,
        gather_distributed: bool = True,
        checkpoint_loss: bool = True,
    ) -> None:
        """Configure the method (defaults: the COCO-Stuff-27 JSON of the reference, seed-methods.md 3.2).

        Args:
            feat_dim: Frozen feature channels C.
            dim: Code dimension D (512; 256 Potsdam).
            pool_size: M.
            tau: Contrastive temperature.
            alpha: Weight of the consistency term (0.05; 0 Potsdam).
            rho: Kept fraction of non-positives in the denominator.
            ema_m: Momentum of the EMA head (0.99 COCO, 0.999 Cityscapes/Potsdam).
            warmup: Steps (0-based index) before lambda starts rising.
            renew_interval: Steps between renewals of Q^sp (100 COCO, 20 Cityscapes/Potsdam).
            reweighting: The reference's ``reweighting`` 1.
            sigma: Attention scale of eq. (9) (28).
            feature_dropout: Dropout2d on the frozen features the task-agnostic masks use (the
                reference's featurizer returns ``dropout(feat)``).
            grad_norm: Clip the head's gradient norm to this (10; 0 disables), as the reference
                clips ``net_model``'s.
            gather_distributed: Pool the entries of all workers when a process group exists.
            checkpoint_loss: Recompute each image's loss terms in the backward pass
                (:func:`hidden_positive_loss`'s ``checkpoint``; same values, less memory, more time).
        """
        super().__init__()
        self.tau, self.alpha, self.rho, self.ema_m = tau, alpha, rho, ema_m
        self.warmup, self.renew_interval, self.reweighting, self.sigma = warmup, renew_interval, reweighting, sigma
        self.gather_distributed = gather_distributed
        self.checkpoint_loss = checkpoint_loss
        self.grad_norm = grad_norm
        self.pools = ReferencePools(pool_size, feat_dim, dim)
        self.feature_dropout = nn.Dropout2d(feature_dropout)

    def before_step(self, model: nn.Module, step: int) -> None:
        """Renew Q^sp every ``renew_interval`` steps (once the pools exist).

        Args:
            model: Unused (hook signature).
            step: Global step, 0-based.
        """
        if self.pools.ready and should_renew(step, self.renew_interval):
            self.pools.renew_()

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Clip the head's gradients, then the momentum update of the EMA head (before the optimiser step).

        Call after the gradients are unscaled (the shared loop calls it after ``scaler.unscale_``).

        Args:
            model: :class:`~lussray.models.stego_head.HPHeads`, possibly DDP-wrapped.
            step: Unused (hook signature).
        """
        heads = unwrap(model)
        if not isinstance(heads, HPHeads):
            raise TypeError(f"HP needs HPHeads, got {type(heads).__name__}")
        if self.grad_norm > 0:
            nn.utils.clip_grad_norm_(heads.head.parameters(), self.grad_norm)
        heads.update_ema(self.ema_m)

    def training_step(
        self,
        model: nn.Module,
        features: Tensor,
        features_aug: Tensor,
        affinity: Tensor,
        labels: Tensor | None,
        step: int,
        total_steps: int,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """One HP step; afterwards this batch's patches are pushed into the pools.

        Args:
            model: :class:`~lussray.models.stego_head.HPHeads`, possibly DDP-wrapped.
            features: Frozen features, (B, C, h, w).
            features_aug: Frozen features of the photometrically augmented images (same geometry).
            affinity: ``FeaturizerOutput.patch_affinity`` of the images, (B, h*w, h*w).
            labels: (B, H, W) ground truth for the linear probe, or None.
            step: Global step, 0-based (for lambda).
            total_steps: Steps of the run (for lambda).
            generator: Random source (pool patches on the CPU, kept negatives on the device of the
                features): a generator on that device, or None for the global ones.

        Returns:
            ``(loss, logs)``: the total and float ``loss``, ``loss_hp``, ``loss_consistency``,
            ``loss_linear``, ``loss_cluster``, ``lambda``, ``pools_ready`` and the positive counts.
        """
        height, width = features.shape[-2:]
        weights = local_positive_weights(affinity, height, width, sigma=self.sigma)
        out = model(features, features_aug, weights)
        f_maps = F.normalize(self.feature_dropout(features).float(), dim=1)
        s_maps = F.normalize(out.code_ema.float(), dim=1)
        lam = hidden_positive_lambda(step, self.warmup, total_steps)
        ready = self.pools.ready
        stats: dict[str, Tensor] = {}
        if ready:
            loss_hp, stats = hidden_positive_loss(
                out.z, out.z_mix, flatten_patches(f_maps), flatten_patches(s_maps), self.pools.agnostic,
                self.pools.specific, patches_per_image=height * width, lam=lam, tau=self.tau, rho=self.rho,
                reweighting=self.reweighting, generator=generator, checkpoint=self.checkpoint_loss)
        else:  # zero, but every projector output stays in the graph (DDP)
            loss_hp = (out.z.sum() + out.z_mix.sum()) * 0.0
        consistency = consistency_loss(out.z, out.z_aug)
        probes = probe_losses(out.linear_logits, out.cluster_cosines, labels)
        loss = loss_hp + self.alpha * consistency + probes["loss_linear"] + probes["loss_cluster"]
        self._push(f_maps, s_maps, generator)
        logged = {"loss": loss, "loss_hp": loss_hp, "loss_consistency": consistency, **probes, **stats}
        values = torch.stack([v.detach().float() for v in logged.values()]).tolist()
        logs = dict(zip(logged, values))
        logs.update({"lambda": lam, "pools_ready": float(ready)})
        return loss, logs

    def _push(self, f_maps: Tensor, s_maps: Tensor, generator: torch.Generator | None) -> None:
        # Independent random patches for the two pools, as the reference's two ``randidx`` draws.
        picked = [sample_patches(f_maps, generator=generator), sample_patches(s_maps, generator=generator)]
        entries = torch.cat(picked, dim=1)
        entries = gather_rows(entries.detach(), self.gather_distributed)
        self.pools.push_(entries[:, : f_maps.shape[1]], entries[:, f_maps.shape[1] :])


__all__ = [
    "BASE_TEMPERATURE",
    "HPMethod",
    "NEIGHBOUR_OFFSETS",
    "ReferencePools",
    "consistency_loss",
    "denominator_mask",
    "gather_rows",
    "hidden_positive_lambda",
    "hidden_positive_loss",
    "hidden_positive_masks",
    "keep_at_random",
    "local_positive_weights",
    "pool_thresholds",
    "propagate_local",
    "sample_patches",
    "should_renew",
]
