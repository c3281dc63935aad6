"""Non-reference online RL stage of OARS (paper §4 "Non-Reference RL Stage", §5.1).

Continues from the full-reference LoRA Delta_FR on unpaired real low-quality images (no HR). The reward
is entirely the COMPASS model's: F, Q_LR and Q_SR all predicted from the (LR, SR) pair, combined by Eq.4.
Still LoRA RL on the BASE weights with the same NFT objective, filter and logging as rl_fr.py (this file
only swaps the data and the reward; the loop is `rl_fr.run`). Output: the final LoRA Delta_NR, which
`infer.py --sft out/sft --lora out/nr.safetensors` merges into the SFT weights (paper §4, last paragraph).

Tiny or mini preset on a CPU:
    python rl_nr.py --model tiny --lora out/fr.safetensors --lr-dir data/lq --group-size 8 --steps 10
    python rl_nr.py --model mini --reward-model mini --lora out/fr.safetensors --lr-dir data/lq --crop-size 64 \
        --group-size 8 --rollout-batch 8 --train-batch 8 --lr 1e-3 --steps 32
Full scale, 8 GPUs, reward model served by vLLM (the paper's deployment):
    torchrun --nproc 8 rl_nr.py --lora out/fr.safetensors --model Qwen/Qwen-Image-Edit-2509 \
        --lr-dir COMPASS-20K/rl_lq --reward-url http://reward-host:8000 --reward-model-name compass --bf16
Test-time tuning (paper Table 4 "TTT"): the same command on the test inputs themselves, e.g.
    python rl_nr.py --lora out/fr.safetensors --lr-dir RealSR/test_LR --steps 50 --out out/ttt.safetensors
Resume: ... --resume latest
"""

from __future__ import annotations

import torch

import backbone as B
import rl_fr
import training as T
from data import LRFolderDataset


def make_nr_reward(args: rl_fr.Args, device: torch.device) -> rl_fr.RewardFn:
    """F, Q_LR, Q_SR all from COMPASS (synthetic-style prompt that asks for fidelity too), one Q_LR per group;
    or RefReward-SR's win rates (--reward refreward)."""
    if args.reward == "refreward":
        return rl_fr.make_refreward(args, device)
    compass = rl_fr.make_compass_scorer(args, synthetic=True, device=device)

    def score(item: dict, srs: torch.Tensor):
        return compass.score_group(B.to_pil(item["lr"]), [B.to_pil(s) for s in srs])

    return score


class CroppedLRDataset(torch.utils.data.Dataset):
    """Unpaired LR images, centre-cropped to `size` x `size` when larger (output = 4*size, paper: 512).
    Smaller ones are used whole, trimmed to a multiple of 4; `inner.check(min_side=8)` rejects tiny ones."""

    def __init__(self, folder: str, size: int):
        self.inner = LRFolderDataset(folder)
        self.size = size

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict:
        item = self.inner[index]
        lr = item["lr"]
        _, h, w = lr.shape
        s = self.size
        if min(h, w) < s:
            # smaller inputs are used whole, trimmed to a multiple of 4 (output sides multiple of 16)
            lr = lr[:, : h - h % 4, : w - w % 4]
        else:
            top, left = (h - s) // 2, (w - s) // 2
            lr = lr[:, top:top + s, left:left + s]
        return {"lr": lr.contiguous(), "name": item["name"]}


def main(argv: list[str] | None = None):
    args = rl_fr.parse_args(argv, defaults={"out": "out/nr.safetensors"}, doc=__doc__)
    if not args.lr_dir:
        raise SystemExit("--lr-dir is required: a folder of real low-quality images (no HR needed)")
    if not args.lora:
        print("note: no --lora given; the paper starts this stage from the full-reference LoRA (rl_fr.py output)")
    dataset = CroppedLRDataset(args.lr_dir, args.crop_size // args.scale)
    try:  # every unreadable or too small file reported by name before any rollout
        dataset.inner.check(min_side=8)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    return rl_fr.run(args, dataset, make_nr_reward)


if __name__ == "__main__":
    T.run_script(main)
