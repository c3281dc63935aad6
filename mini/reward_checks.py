"""Do the mini reward models order pairs whose order is not in doubt? Held-out photos only.

A reward that RL can climb honestly must at least prefer a clean image to the same image visibly damaged. On
64x64 crops of photos.HELDOUT (never trained on) with their plain LR (Gaussian blur 0.8 + bicubic 4x down),
each crop gives one pair of every kind, (better, worse):

    hr>blur          the HR vs the HR blurred (Gaussian, sigma 2 px)
    hr>noise         the HR vs the HR + Gaussian noise (std 0.1)
    hr>jpeg          the HR vs the HR as JPEG quality 8
    hr>nearest       the HR vs the LR upscaled by nearest neighbour (blocks of 4x4 px)
    bicubic>nearest  the LR upscaled bicubically vs by nearest neighbour
    sft>blur         the shipped mini SFT's sample (`infer.py --model mini --sft mini` defaults) vs the same
    sft>noise        sample damaged the same way, or with a periodic pattern (a 4 px grid of amplitude 0.1:
    sft>pattern      the artefact an RL policy found in the mini COMPASS)

COMPASS (`reward.make_scorer`, averaged over `--views` flips/rotations): a pair is right when Eq.4's reward R of
the better image exceeds the worse one's; a pair with an unparsable reading is counted as invalid and excluded
(never a 0). RefReward-SR (`refreward.RefRewardScorer`): each pair is asked in both orders and is right only
when both verdicts pick the better image; position-inconsistent or invalid answers count as wrong.

    python -m mini.reward_checks --out out/reward_checks            # the shipped mini COMPASS and RefReward-SR
    python -m mini.reward_checks --compass tiny --refreward tiny --crops 2 --views 1 --no-sft   # plumbing
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

import infer
import reward
from common import backbone as B
from common import data
from common import training as T
from mini import photos, sr_eval
from refreward_sr import refreward

KINDS = ("hr>blur", "hr>noise", "hr>jpeg", "hr>nearest", "bicubic>nearest", "sft>blur", "sft>noise", "sft>pattern")


@dataclass
class Args:
    compass: str = "mini"
    """COMPASS to check: 'mini', 'tiny', a folder; '' skips it"""
    refreward: str = "mini"
    """RefReward-SR to check: 'mini', 'tiny', a folder; '' skips it"""
    crops: int = 16
    """64x64 held-out crops (one pair of every kind each)"""
    seed: int = 300
    """seed of the crops and of the damage's noise (a stream of its own: not the SR tables' crops)"""
    views: int = 8
    """COMPASS readings averaged over this many flips/rotations (the shipped evaluation's 8)"""
    sft: bool = True
    """also the sft>... pairs (samples of the shipped mini SFT, 1 s per crop); --no-sft skips them"""
    threads: int = 2
    """torch threads"""
    out: str = "out/reward_checks"
    """folder for results.json and table.md"""


def blur(x: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    return data.filter2d(x, data.gaussian_family_kernel(21, sigma, sigma)).clamp(0, 1)


def noise(x: torch.Tensor, generator: torch.Generator, std: float = 0.1) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=generator)).clamp(0, 1)


def pattern(x: torch.Tensor, period: int = 4, amplitude: float = 0.1) -> torch.Tensor:
    """A periodic grid: every `period`-th row and column brightened by `amplitude` (a visible lattice)."""
    h, w = x.shape[-2:]
    grid = ((torch.arange(h) % period == 0)[:, None] | (torch.arange(w) % period == 0)[None]).float()
    return (x + amplitude * grid).clamp(0, 1)


def nearest(lr: torch.Tensor, scale: int = 4) -> torch.Tensor:
    return torch.nn.functional.interpolate(lr, scale_factor=scale, mode="nearest")


def make_pairs(hr: torch.Tensor, lr: torch.Tensor, sft: torch.Tensor | None, seed: int) -> dict[str, tuple]:
    """{kind: (better (N,3,H,W), worse (N,3,H,W))} for the kinds above (the sft>... kinds only with `sft`)."""
    g = torch.Generator().manual_seed(seed)
    pairs = {"hr>blur": (hr, blur(hr)), "hr>noise": (hr, noise(hr, g)), "hr>jpeg": (hr, data.jpeg(hr, [8] * len(hr))),
             "hr>nearest": (hr, nearest(lr)), "bicubic>nearest": (B.upscale(lr), nearest(lr))}
    if sft is not None:
        pairs |= {"sft>blur": (sft, blur(sft)), "sft>noise": (sft, noise(sft, g)), "sft>pattern": (sft, pattern(sft))}
    return pairs


def accuracy(right: list[bool | None]) -> dict:
    """{"right", "counted", "invalid", "accuracy"}: None = invalid, excluded from the accuracy's denominator."""
    counted = [r for r in right if r is not None]
    return {"right": sum(counted), "counted": len(counted), "invalid": len(right) - len(counted),
            "accuracy": sum(counted) / len(counted) if counted else float("nan")}


def compass_right(scorer, lr: torch.Tensor, better: torch.Tensor, worse: torch.Tensor) -> list[bool | None]:
    """Per pair: R(better) > R(worse) by Eq.4 of the scorer's readings; None when either reading is invalid."""
    right = []
    for i in range(len(lr)):
        scores = scorer.score_group(B.to_pil(lr[i]), [B.to_pil(better[i]), B.to_pil(worse[i])])
        r = scores.reward()
        right.append(bool(r[0] > r[1]) if bool(scores.valid.all()) else None)
    return right


def refreward_right(scorer: refreward.RefRewardScorer, lr: torch.Tensor, better: torch.Tensor,
                    worse: torch.Tensor) -> list[bool]:
    """Per pair: both orders pick the better image (position-inconsistent or invalid = wrong)."""
    return [scorer.compare(B.to_pil(lr[i]), [B.to_pil(better[i])], [B.to_pil(worse[i])])[0] == "x"
            for i in range(len(lr))]


def main(argv: list[str] | None = None) -> dict:
    args, parser = T.parse_dataclass_args(Args, argv, __doc__.split("\n")[0])
    if not (args.compass or args.refreward):
        parser.error("--compass '' and --refreward '': nothing to check")
    try:
        reward.check_views(args.views, "--views")
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    hr = photos.random_crops(photos.HELDOUT, args.crops, 64, torch.Generator().manual_seed(args.seed))
    lr = data.plain_degrade(hr, 0.8)
    sft = None
    if args.sft:  # as the SR tables sample it: infer.py's defaults for --model mini, one seed for every crop
        sft = sr_eval.run_model(infer.load_policy("mini", "mini"), lr, 40, args.seed)[0]
    pairs = make_pairs(hr, lr, sft, args.seed + 1)
    judges, rr = {}, None
    if args.compass:
        scorer = reward.make_scorer(args.compass, views=args.views)
        judges["COMPASS"] = lambda lr_, b, w: compass_right(scorer, lr_, b, w)
    if args.refreward:
        rr = refreward.RefRewardScorer(*refreward.load_refreward(args.refreward))
        judges["RefReward-SR"] = lambda lr_, b, w: refreward_right(rr, lr_, b, w)
    results = {}
    for judge, right_of in judges.items():
        per_kind = {kind: right_of(lr, better, worse) for kind, (better, worse) in pairs.items()}
        results[judge] = {kind: accuracy(r) for kind, r in per_kind.items()}
        results[judge]["all"] = accuracy([x for r in per_kind.values() for x in r])
        print(f"{judge}: " + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in results[judge].items()), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: getattr(args, k) for k in Args.__dataclass_fields__}, "results": results}
    if rr is not None:  # answers, invalid answers, position-inconsistent pairs (the verdict followed A/B)
        record["refreward_stats"] = dict(rr.stats)
        print(f"RefReward-SR answers: {dict(rr.stats)}", flush=True)
    T.atomic_write_text(json.dumps(record, indent=1), out / "results.json")
    kinds = [*pairs, "all"]
    lines = ["| judge | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    lines += [f"| {judge} | " + " | ".join(f"{rows[k]['accuracy']:.2f} ({rows[k]['right']}/{rows[k]['counted']}"
                                           f"{', ' + str(rows[k]['invalid']) + ' invalid' if rows[k]['invalid'] else ''})"
                                           for k in kinds) + " |"
              for judge, rows in results.items()]
    T.atomic_write_text("\n".join(lines) + "\n", out / "table.md")
    return results


if __name__ == "__main__":
    main()
