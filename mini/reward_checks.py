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
(never a 0). Two more rows read the same readings one part at a time, to say which part fails: "COMPASS F" is
right when the predicted fidelity F of the better image is higher, "COMPASS Q_SR" when its predicted quality
is. RefReward-SR (`refreward.RefRewardScorer`): each pair is asked in both orders and is right only when both
verdicts pick the better image; position-inconsistent or invalid answers count as wrong. GT-free baselines
(`--baselines`, they see only the two candidates, as COMPASS does not see the HR): a pair is right when the
better image scores better; a tie is wrong (the metric cannot tell them apart).

    python -m mini.reward_checks --out out/reward_checks            # the shipped mini COMPASS and RefReward-SR
    python -m mini.reward_checks --compass tiny --refreward tiny --crops 2 --views 1 --no-sft   # plumbing
    python -m mini.reward_checks --compass O1/compass --refreward '' --baselines snb,piqe   # a rebuilt COMPASS
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
from evaluation.evaluate import create_metric, short_reason, snb_quality
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
    baselines: str = ""
    """comma-separated GT-free baselines judged on the same pairs: snb (evaluate.snb_quality, the annotation's Q
    anchor), piqe, or any pyiqa no-reference metric whose weights are present ('' none)"""
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


def compass_right(scorer, lr: torch.Tensor, better: torch.Tensor,
                  worse: torch.Tensor) -> dict[str, list[bool | None]]:
    """Per pair, from one reading of both images: {"R": R(better) > R(worse) by Eq.4, "F": F(better) > F(worse),
    "Q_SR": Q_SR(better) > Q_SR(worse)}; None when either reading is invalid."""
    right: dict[str, list[bool | None]] = {"R": [], "F": [], "Q_SR": []}
    for i in range(len(lr)):
        scores = scorer.score_group(B.to_pil(lr[i]), [B.to_pil(better[i]), B.to_pil(worse[i])])
        valid = bool(scores.valid.all())
        for part, value in (("R", scores.reward()), ("F", scores.F), ("Q_SR", scores.q_sr)):
            right[part].append(bool(value[0] > value[1]) if valid else None)
    return right


def baseline_judge(name: str):
    """A GT-free no-reference metric as a judge: (lr, better, worse) -> per pair, does the better image score
    better (strictly: a tie is wrong)? 'snb' needs no weights; a pyiqa name raises if its weights are missing."""
    if name == "snb":
        score, sign = snb_quality, 1.0
    else:
        metric = create_metric(name)
        if metric.metric_mode != "NR":
            raise ValueError(f"a GT-free baseline must be a no-reference metric; {name} is {metric.metric_mode}")
        score, sign = (lambda x: metric(x).flatten()), (-1.0 if metric.lower_better else 1.0)

    def right(lr: torch.Tensor, better: torch.Tensor, worse: torch.Tensor) -> list[bool]:
        with torch.no_grad():
            b, w = sign * score(better).flatten(), sign * score(worse).flatten()
        return [bool(x > y) for x, y in zip(b.tolist(), w.tolist())]
    return right


def refreward_right(scorer: refreward.RefRewardScorer, lr: torch.Tensor, better: torch.Tensor,
                    worse: torch.Tensor) -> list[bool]:
    """Per pair: both orders pick the better image (position-inconsistent or invalid = wrong)."""
    return [scorer.compare(B.to_pil(lr[i]), [B.to_pil(better[i])], [B.to_pil(worse[i])])[0] == "x"
            for i in range(len(lr))]


def main(argv: list[str] | None = None) -> dict:
    args, parser = T.parse_dataclass_args(Args, argv, __doc__.split("\n")[0])
    if not (args.compass or args.refreward or args.baselines):
        parser.error("--compass '', --refreward '' and no --baselines: nothing to check")
    try:
        reward.check_views(args.views, "--views")
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    # every judge, built before the crops are sampled (a bad folder or metric fails at once):
    # (lr, better, worse) -> {table row: per pair right / wrong / None (invalid)}
    judges, rr = [], None
    if args.compass:
        scorer = reward.make_scorer(args.compass, views=args.views)
        judges.append(lambda lr_, b, w: {f"COMPASS{'' if part == 'R' else ' ' + part}": r
                                         for part, r in compass_right(scorer, lr_, b, w).items()})
    if args.refreward:
        rr = refreward.RefRewardScorer(*refreward.load_refreward(args.refreward))
        judges.append(lambda lr_, b, w: {"RefReward-SR": refreward_right(rr, lr_, b, w)})
    for name in filter(None, (n.strip() for n in args.baselines.split(","))):
        try:
            right_of = baseline_judge(name)
        except Exception as err:  # pyiqa raises many types for a missing weight file or an unknown name
            parser.error(f"--baselines {name}: {short_reason(err)}")
        judges.append(lambda lr_, b, w, right_of=right_of, row=f"{name.upper()} (GT-free)": {row: right_of(lr_, b, w)})
    hr = photos.random_crops(photos.HELDOUT, args.crops, 64, torch.Generator().manual_seed(args.seed))
    lr = data.plain_degrade(hr, 0.8)
    sft = None
    if args.sft:  # as the SR tables sample it: infer.py's defaults for --model mini, one seed for every crop
        sft = sr_eval.run_model(infer.load_policy("mini", "mini"), lr, 40, args.seed)[0]
    pairs = make_pairs(hr, lr, sft, args.seed + 1)
    results: dict[str, dict] = {}
    for right_of in judges:
        per_kind = {kind: right_of(lr, better, worse) for kind, (better, worse) in pairs.items()}
        for row in next(iter(per_kind.values())):
            results[row] = {kind: accuracy(rows[row]) for kind, rows in per_kind.items()}
            results[row]["all"] = accuracy([x for rows in per_kind.values() for x in rows[row]])
            print(f"{row}: " + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in results[row].items()), flush=True)
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
