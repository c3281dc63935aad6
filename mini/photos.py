"""Photographs that ship inside installed packages: the training and held-out images of the mini presets.

No data set can be downloaded on the machines this project is built and tested on, so the mini presets
(`mini/build_backbone.py`, `mini/build_compass.py`) and the demo learn from the real photographs that
come with packages the project installs anyway:

    scikit-image   skimage.data: astronaut, chelsea, coffee, rocket, hubble_deep_field,
                   immunohistochemistry, retina, stereo_motorcycle (left view), and ten grey ones
    scikit-learn   sklearn.datasets.load_sample_images(): china, flower
    matplotlib     mpl-data/sample_data/grace_hopper.jpg
    pyiqa          ResultsCalibra/ref_dir/I03, I04, I06, I08, I19 (512x384 reference images) and
                   tests/test_efficiency_img_dir/ (one SPAQ phone photo, three video frames)

`HELDOUT` names four colour photos that no mini model ever trains on; every evaluation of the mini
presets (SR tables, reward-model accuracy, RL before/after) uses crops of them only.

Images are float tensors (3, H, W) in [0, 1]; grey photos are repeated to RGB.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

COLOUR = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "motorcycle", "grace_hopper", "china", "flower", "I03", "I04", "I06", "I08", "I19", "SPAQ_10241",
          "frame_4wrwr48cdk6rbcjl", "frame_7gzdcz9sif0ekg31", "frame_9ogwhvvy7gfj6jzh")
GREY = ("camera", "brick", "grass", "gravel", "coins", "clock", "moon", "page", "text", "cell")
HELDOUT = ("coffee", "I04", "frame_9ogwhvvy7gfj6jzh", "china")
"""Never trained on by any mini model: a cup of coffee on wood, a woman in a red hat, a snowy highway with
cars, a pagoda over water."""
ALL = COLOUR + GREY
TRAIN = tuple(n for n in ALL if n not in HELDOUT)


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (importing pyiqa is slow and noisy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; `make install` installs it "
                                  "(its sample photographs are part of the mini presets' data)")
    return Path(next(iter(spec.submodule_search_locations)))


def _file(package: str, relative: str) -> np.ndarray:
    from PIL import Image

    path = _package_dir(package).parent / relative if package == "pyiqa" else _package_dir(package) / relative
    if not path.is_file():
        raise FileNotFoundError(f"sample photograph {path} not found: the installed {package} differs from "
                                "the pinned version in requirements.txt")
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@lru_cache(maxsize=None)
def _load_array(name: str) -> np.ndarray:
    """(H, W, 3) uint8 of one named photograph."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    if name == "grace_hopper":
        return _file("matplotlib", "mpl-data/sample_data/grace_hopper.jpg")
    if name.startswith("I") and name[1:].isdigit():
        return _file("pyiqa", f"ResultsCalibra/ref_dir/{name}.bmp")
    if name.startswith(("SPAQ_", "frame_")):
        return _file("pyiqa", f"tests/test_efficiency_img_dir/{name}.jpg")
    from skimage import data

    if name == "motorcycle":
        return data.stereo_motorcycle()[0]
    if name not in COLOUR + GREY:
        raise KeyError(f"unknown photograph {name!r}; known: {', '.join(ALL)}")
    arr = getattr(data, name)()
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr[..., :3]


def load_photo(name: str) -> torch.Tensor:
    """One photograph as a float tensor (3, H, W) in [0, 1]."""
    return torch.from_numpy(_load_array(name).copy()).permute(2, 0, 1).float() / 255


def downscale(img: torch.Tensor, short_side: int) -> torch.Tensor:
    """Area-resize (3, H, W) so that its shorter side is `short_side` (never upscales)."""
    h, w = img.shape[-2:]
    factor = short_side / min(h, w)
    if factor >= 1:
        return img
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    return F.interpolate(img[None], size=size, mode="area")[0]


@lru_cache(maxsize=None)
def pyramid(name: str, short_sides: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The photograph area-downscaled to each shorter side in `short_sides`, then at full size (cached)."""
    full = load_photo(name)
    return tuple(downscale(full, s) for s in short_sides if s < min(full.shape[-2:])) + (full,)


def random_crops(names: Sequence[str], n: int, size: int, generator: torch.Generator,
                 short_sides: Sequence[int] = (96, 128, 192, 256, 384)) -> torch.Tensor:
    """n random `size` x `size` crops (n, 3, size, size) from the named photographs.

    Each crop picks a photograph uniformly, then a scale (the photo area-downscaled so its shorter side
    is one of `short_sides`, or left at full size), then a position, then a horizontal flip. Small
    scales give crops with whole objects and many edges, full size gives textures; the area downscale
    also averages away the sensor noise and JPEG blocks of the original files, so crops are clean HR.
    """
    pyramids = {name: [level for level in pyramid(name, tuple(short_sides)) if min(level.shape[-2:]) >= size]
                for name in dict.fromkeys(names)}
    names = list(pyramids)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        levels = pyramids[names[int(torch.randint(len(names), (), generator=generator))]]
        img = levels[int(torch.randint(len(levels), (), generator=generator))]
        h, w = img.shape[-2:]
        top = int(torch.randint(h - size + 1, (), generator=generator))
        left = int(torch.randint(w - size + 1, (), generator=generator))
        crop = img[:, top:top + size, left:left + size]
        out[i] = crop.flip(-1) if bool(torch.rand((), generator=generator) < 0.5) else crop
    return out
