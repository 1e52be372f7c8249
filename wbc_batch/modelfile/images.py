"""Real images for the checks and fits run on a model: a seeded sample of a folder, decoded as the model decodes.

Export's parity check and quantisation's calibration read the same sample; both decode through the
classify path (:func:`wbc_batch.inference.preprocess.load_image`), so the figures hold for what classify feeds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..inference.discover import iter_images
from ..inference.preprocess import ImageError, PreprocessSpec, load_image


def random_sample(data_dir: str | os.PathLike[str], n: int = 256, seed: int = 0) -> list[str]:
    """Up to ``n`` real images spread over the classes of a class-folder directory, in path order."""
    files = [f.path for f in iter_images([data_dir])]
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(files))[:n]
    return [files[i] for i in sorted(idx)]


def decode_sample(paths: Sequence[str], spec: PreprocessSpec) -> np.ndarray:
    """The images of ``paths`` that decode, (N, H, W, 3) uint8; a file that does not is left out."""
    out = []
    for p in paths:
        try:
            out.append(load_image(p, spec))
        except ImageError:
            continue
    return np.stack(out) if out else np.zeros((0, spec.height, spec.width, 3), np.uint8)
