"""Non-reference online RL stage of OARS (paper §4 "Non-Reference RL Stage", §5.1).

Continues from the full-reference LoRA Delta_FR on unpaired real low-quality images (no HR). The reward
is entirely the COMPASS model's: F, Q_LR and Q_SR all predicted from the (LR, SR) pair, combined by Eq.4.
Still LoRA RL on the BASE weights with the same NFT objective, filter and logging as the full-reference
stage ("the policy optimization objective follows the same process as in the reference-based stage",
§4): this file swaps the data and the reward; the loop it runs is `rl_fr.run`, one import away in
rl_fr.py. Output: the final LoRA Delta_NR, which `infer.py --sft out/sft --lora out/nr.safetensors`
merges into the SFT weights (paper §4, last paragraph).

Tiny or mini preset on a CPU:
    python rl_nr.py --model tiny --reward-model tiny --lora out/fr.safetensors --lr-dir data/lq --group-size 8 \
        --steps 10
    python rl_nr.py --model mini --reward-model mini --lora out/fr.safetensors --lr-dir data/lq --crop-size 64 \
        --group-size 8 --rollout-batch 8 --train-batch 8 --steps 32
Full scale, 8 GPUs (Qwen/Qwen-Image-Edit-2509 is the default --model; bf16 and gradient checkpointing are on
by default on GPUs; COMPASS served by vLLM, the paper's deployment, or in-process from out/compass):
    torchrun --nproc 8 rl_nr.py --lora out/fr.safetensors --lr-dir COMPASS-20K/rl_lq \
        --reward-url http://reward-host:8000
Test-time tuning (paper Table 4 "TTT"): the same command on the test inputs themselves, e.g.
    torchrun --nproc 8 rl_nr.py --lora out/fr.safetensors --lr-dir RealSR/test_LR --steps 50 \
        --out out/ttt.safetensors --reward-url http://reward-host:8000
Resume: ... --resume latest
"""

from __future__ import annotations

from functools import partial

import torch

import rl_fr
from common import training as T
from common.data import LRFolderDataset


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
    args = rl_fr.parse_args(argv, defaults={"out": "out/nr.safetensors"}, doc=__doc__,
                            exclude=("hr_dir", "fidelity"))  # no HR here: COMPASS predicts F
    if not args.lr_dir:
        raise T.RunError("--lr-dir is required: a folder of real low-quality images (no HR needed)")
    if not args.lora:
        print("note: no --lora given; the paper starts this stage from the full-reference LoRA (rl_fr.py output)")
    dataset = CroppedLRDataset(args.lr_dir, args.crop_size // args.scale)
    try:  # every unreadable or too small file reported by name before any rollout
        dataset.inner.check(min_side=8)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    # the loop of both RL stages (rl_fr.run); the reward: F, Q_LR, Q_SR all from COMPASS (rl_fr.make_reward)
    return rl_fr.run(args, dataset, partial(rl_fr.make_reward, full_reference=False))


if __name__ == "__main__":
    T.run_script(main)
