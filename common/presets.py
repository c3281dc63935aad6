"""The mini presets shipped in `mini/`: where their files are, how they are checked, how to rebuild them.

Every model of the project has three doors on one code path (README, "Models"): the real checkpoint by
name or folder, the `tiny` preset (random weights from tiny configs, for unit tests) and the `mini`
preset: small configs of the same classes whose weights were trained on a CPU by a script of this
repository and are committed in `mini/`:

    mini/backbone/                    diffusers pipeline folder of the mini BASE model  (--model mini)
    mini/sft/transformer.safetensors  its cold start, made by train_sft.py             (--sft mini)
    mini/compass/                     the mini COMPASS reward model (save_pretrained)  (--reward-model mini)
    mini/compass_base/                its pretrained Qwen3-VL (the analogue of the 8B checkpoint that
                                      COMPASS and RefReward-SR are fine-tuned from)
    mini/refreward/                   the mini RefReward-SR pairwise reward model    (--reward refreward)

`python -m mini.build_backbone` rebuilds the first two, `python -m mini.build_compass` the last three. A missing or damaged
file is reported by name with the command that rebuilds it, before any model code tries to read it.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mini"
MINI_BACKBONE = ROOT / "backbone"
MINI_SFT = ROOT / "sft" / "transformer.safetensors"
MINI_COMPASS = ROOT / "compass"
MINI_COMPASS_BASE = ROOT / "compass_base"
MINI_REFREWARD = ROOT / "refreward"
# How many flips/rotations of each (LR, SR) pair the mini COMPASS's evaluations average its readings over
# (reward.LocalScorer views): its shipped evaluation (`compass_eval.json`, "views"; mini/build_compass.py
# --views) and the held-out evaluations of the demo, miniature.py and bench.py. Their RL rewards read one view.
MINI_COMPASS_VIEWS = 8
# The output size (px) the mini backbone was trained on: it returns a uniform mosaic at larger token grids (its
# RoPE positions and attention never saw them), so infer.py tiles at this size for --model mini.
MINI_TRAINED_SIZE = 64
# infer.py --back-projection for --model mini (the real model's default is 0, the paper's output): the mini SFT
# loses part of the coarse content of its input, which back-projection onto the LR gives back (mini/README.md,
# "A mini SFT that keeps the picture": chosen on the 'val' split of mini/sr_eval.py, training photos).
MINI_BACK_PROJECTION = 4
# infer.py --flat-gate for --model mini (the real model's default is 0): after back-projection, the output's detail
# over the LR's bicubic upscale fades out where that upscale is flat (5x5 std of Y below 4 levels), which takes the
# mini SFT's grain off sky and skin (mini/README.md; the largest threshold that keeps the detail at least halfway
# from bicubic's to the HR's on both 'val' sets of mini/sr_eval.py).
MINI_FLAT_GATE = 4.0
REBUILD_BACKBONE = "python -m mini.build_backbone"
REBUILD_COMPASS = "python -m mini.build_compass"
REBUILD_COMPASS_BASE = "python -m mini.build_compass --stage pretrain"
REBUILD_REFREWARD = "python -m mini.build_compass --stage refreward"


def check_files(files: list[Path], what: str, rebuild: str) -> None:
    """Raise if one of `files` is missing or unreadable, naming it and the command that rebuilds it.

    A safetensors file must hold a JSON header whose tensors end exactly at the end of the file (a
    truncated copy or a git-lfs pointer fails); a JSON file must parse.
    """
    for path in files:
        advice = f"Rebuild the {what} with `{rebuild}` (or restore it with `git checkout -- {path}`)."
        if not path.is_file():
            raise FileNotFoundError(f"{what}: {path} is missing. {advice}")
        try:
            if path.suffix == ".safetensors":
                _check_safetensors(path)
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as err:  # noqa: BLE001 - any failure to read means the file is damaged
            raise ValueError(f"{what}: {path} is damaged ({type(err).__name__}: {err}). {advice}") from err


def _check_safetensors(path: Path) -> None:
    """Header length (8 bytes, little endian), JSON header, then exactly the data its offsets describe."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if size < 8 + header_len:
            raise ValueError(f"{size} bytes, shorter than its {header_len}-byte header")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + header_len + end:
        raise ValueError(f"{size} bytes, but the header describes {8 + header_len + end}")


def weight_files(folder: Path) -> list[Path]:
    """The files a save_pretrained folder needs: its JSON files, and beside every model config.json the
    weights file that config implies (diffusers: diffusion_pytorch_model.safetensors, transformers:
    model.safetensors), so a deleted weights file is named, not only a damaged one."""
    files = {p for p in folder.rglob("*") if p.suffix in (".json", ".safetensors")}
    for config in folder.rglob("config.json"):
        try:
            diffusers_model = "_class_name" in json.loads(config.read_text())
        except ValueError:
            continue  # a damaged config is named by check_files
        files.add(config.parent / ("diffusion_pytorch_model.safetensors" if diffusers_model else "model.safetensors"))
    return sorted(files)


def mini_backbone() -> Path:
    """The checked mini base pipeline folder."""
    check_files([MINI_BACKBONE / "model_index.json"], "mini backbone", REBUILD_BACKBONE)
    check_files(weight_files(MINI_BACKBONE), "mini backbone", REBUILD_BACKBONE)
    return MINI_BACKBONE


def mini_sft() -> Path:
    """The checked mini SFT transformer weights."""
    check_files([MINI_SFT], "mini SFT weights", REBUILD_BACKBONE)
    return MINI_SFT


def checked_model_folder(folder: Path, what: str, rebuild: str) -> Path:
    """A save_pretrained folder whose config.json and weights were checked (named with `rebuild` if not)."""
    check_files([folder / "config.json"], what, rebuild)
    check_files(weight_files(folder), what, rebuild)
    return folder


def mini_compass() -> Path:
    """The checked mini COMPASS folder."""
    return checked_model_folder(MINI_COMPASS, "mini COMPASS", REBUILD_COMPASS)


def mini_compass_base() -> Path:
    """The checked pretrained mini Qwen3-VL folder."""
    return checked_model_folder(MINI_COMPASS_BASE, "mini COMPASS base", REBUILD_COMPASS_BASE)


def mini_refreward() -> Path:
    """The checked mini RefReward folder."""
    return checked_model_folder(MINI_REFREWARD, "mini RefReward", REBUILD_REFREWARD)
