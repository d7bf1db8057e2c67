"""How every random choice of a run derives from its one ``seed`` (pure, no Ray).

The config key ``seed`` (:class:`lussray.config.LussConfig`) is the only source of randomness:

- the training streams: the chunk order of every epoch and the row order of every window
  (:mod:`lussray.data.epoch_plan`, salted by the stage), and each sample's augmentation
  (:func:`sample_rng`: from seed, stage, epoch and sample key, so it does not depend on which
  worker or task draws it, or in which order);
- model initialisation, k-means initialisation and the baselines: :func:`derived_seed` of the
  seed and a name (``derived_seed(seed, "pretrain", "model")``).

Names salt the seeds so that two stages of one run never draw the same stream.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np


def stage_salt(name: str) -> int:
    """A stable 32-bit integer of a name (a stage, a purpose)."""
    return zlib.crc32(name.encode("utf-8"))


def key_entropy(key: str) -> int:
    """A stable 64-bit integer of a sample key (the first 8 bytes of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")


def derived_seed(seed: int, *names: str) -> int:
    """A 32-bit seed for one purpose of a run (``torch.manual_seed``, faiss, numpy)."""
    sequence = np.random.SeedSequence([int(seed), *(stage_salt(name) for name in names)])
    return int(sequence.generate_state(1, np.uint32)[0])


def sample_rng(seed: int, salt: int, epoch: int, key: str) -> np.random.Generator:
    """The generator of one sample's augmentation in one epoch of one stage.

    The same (seed, stage salt, epoch, key) gives the same draws in any process, on any worker,
    in any order, so a rerun, a resumed run and a second pass over an epoch (PiCIE's clustering)
    see identical views; another epoch gives new ones.
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(salt), int(epoch), key_entropy(key)]))
