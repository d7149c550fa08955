"""The opt-in k-means start of the delegator's selection head (``--selection-init kmeans``).

pycoe's formulation, not from the CoE paper. With a zero selection head the WGM's first partitions are arbitrary
(every expert scores the same) and the K copies of the universal expert drift apart by chance, so the LGM's first
labels are mostly noise. Here the delegator's features ``f`` (``Tensor[N, D]``) of some training images are
standardised to ``z = (f - mu) / sd`` and clustered by :func:`balanced_kmeans` into K groups of near-equal size,
and the selection logits become ``(2 z.c_k - |c_k|^2) / T``. Their argmax is the nearest centroid, and they are
an affine function of ``f``, so the head is exactly a ``Linear(D, K)``. ``T`` makes the median gap between the
nearest and the second-nearest centroid a logit gap of 2. The WGM's first partition is then one that the
delegator predicts by construction and that groups similar images; WGM and LGM refine it from there.

:func:`kmeans_start` is the step of the recipe: it computes the features of ``--kmeans-samples`` training images
and sets the head.

Shapes: N points, D features, K clusters (= experts).
"""

from __future__ import annotations

import torch

from examples.imagenet.data import ImageFolderBatches, TensorBatches
from examples.imagenet.runtime import derived_seed
from examples.imagenet.training import to_device
from pycoe.routing.transport import balanced_assignment
from pycoe.twostage.delegator import Delegator
from pycoe.utils import eval_mode

__all__ = ["balanced_kmeans", "kmeans_selection_init", "kmeans_start"]


@torch.no_grad()
def balanced_kmeans(
    z: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 30
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """K-means whose clusters hold near-equal numbers of points.

    k-means++ seeding, then Lloyd iterations whose assignment step is the balanced transportation problem
    (:func:`pycoe.routing.transport.balanced_assignment` on ``-|z_n - c_k|^2``, near-equal capacities) and
    whose update step is the mean of each cluster; stops when the assignment no longer changes.

    Args:
        z: Tensor[N, D] points (N >= k).
        k: number of clusters.
        generator: the random source of the seeding.
        iterations: the most Lloyd iterations.

    Returns:
        ``(centres Tensor[K, D], assignment LongTensor[N], iterations run)``.
    """
    centres = z[torch.randint(len(z), (1,), generator=generator)]
    while len(centres) < k:
        d2 = torch.cdist(z, centres).pow(2).amin(1)
        if float(d2.sum()) <= 0:  # fewer distinct points than clusters: take any point
            pick = torch.randint(len(z), (1,), generator=generator)
        else:
            pick = torch.multinomial(d2 / d2.sum(), 1, generator=generator)
        centres = torch.cat([centres, z[pick]])
    assign, it = None, 0
    for it in range(1, iterations + 1):  # noqa: B007 (the iteration count is returned)
        new = balanced_assignment(-torch.cdist(z, centres).pow(2), method="exact")
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centres = torch.stack([z[assign == j].mean(0) for j in range(k)])
    assert assign is not None
    return centres, assign, it


@torch.no_grad()
def kmeans_selection_init(delegator: Delegator, features: torch.Tensor, generator: torch.Generator) -> dict:
    """Set the selection head to the nearest-centroid rule of a balanced k-means of ``features``.

    Args:
        delegator: a :class:`~pycoe.twostage.delegator.Delegator` (its ``selection_head`` is a ``Linear(D, K)``).
        features: Tensor[N, D], the delegator's backbone features of N >= K training images (eval mode,
            un-augmented).
        generator: the random source of the k-means seeding (deterministic given its seed, so every DDP rank
            computes the same head).

    Returns:
        dict with ``centres`` Tensor[K, D], ``mean`` and ``std`` Tensor[D] (of the features), ``temperature``,
        ``assignment`` LongTensor[N] and ``iterations``.
    """
    k = delegator.num_experts
    feats = features.float().cpu()
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mu) / sd  # [N, D]
    centres, assign, iterations = balanced_kmeans(z, k, generator)
    d2 = torch.cdist(z, centres).pow(2).sort(1).values  # [N, K]
    temperature = float((d2[:, 1] - d2[:, 0]).median().clamp_min(1e-6)) / 2.0 if k > 1 else 1.0
    # logits_k = (2 z.c_k - |c_k|^2) / T with z = (f - mu) / sd, written as W f + b
    weight = 2.0 * centres / sd / temperature  # [K, D]
    bias = (-(centres * centres).sum(1) - 2.0 * (centres * (mu / sd)).sum(1)) / temperature  # [K]
    head = delegator.selection_head
    head.weight.copy_(weight.to(head.weight))
    head.bias.copy_(bias.to(head.bias))
    return {
        "centres": centres,
        "mean": mu,
        "std": sd,
        "temperature": temperature,
        "assignment": assign,
        "iterations": iterations,
    }


def kmeans_start(args, delegator: Delegator, dataset, device) -> dict:
    """``--selection-init kmeans``: the delegator's features of a seeded random subset of ``--kmeans-samples``
    training images (un-augmented, eval mode), then :func:`kmeans_selection_init`.

    Deterministic given ``--seed`` (its own generator; the global RNG is not touched), so every DDP rank
    computes the same head. Returns the k-means result plus ``indices`` (the clustered training samples).
    """
    k, n = args.num_experts, len(dataset)
    g = torch.Generator().manual_seed(derived_seed(args.seed, 7919))
    idx = torch.randperm(n, generator=g)[: min(n, max(k, args.kmeans_samples))].sort().values
    batches: TensorBatches | ImageFolderBatches
    if args.dataset == "imagefolder":
        subset = torch.utils.data.Subset(dataset, idx.tolist())
        batches = ImageFolderBatches(subset, args.batch_size, False, 0, 1, 0, args.workers)
    else:
        batches = TensorBatches(dataset.take(idx), 512, False, 0, 1, 0)
    with eval_mode(delegator):
        feats = torch.cat([delegator.features(to_device(x, device, args)).float().cpu() for x, _ in batches])
    return dict(kmeans_selection_init(delegator, feats, g), indices=idx)
