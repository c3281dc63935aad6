"""Rebuild the RealSR-R1 mini presets (realsr_r1/mini/) on a CPU from photographs that ship in installed packages.

Stages (each resumable: a finished stage is skipped, a killed training stage continues from its last checkpoint):

    vq     the VQ tokenizer (model.MINI["vq"]: LlamaGen's layout at 4x, 1,024 codes of 8 dims, L2-normalised), trained
           from scratch on 48 px crops of mini/photos.py TRAIN (and bicubic-upscaled degraded LRs, which the prompt
           shows it) with model.vq_loss; unused codes are restarted from the batch's latents every 100 steps
    init   a random mini Chameleon (model.MINI["policy"]) over the mini vocabulary, pointing at the VQ
    sft    the cold start: `train_realsr_r1 sft` on 48 px crops (LR 12 px, bicubic-upscaled into the prompt:
           --lr-size output), the mini degradation ranges, the ORACLE texts -> realsr_r1/mini/sft ('mini-sft')
    grpo   VLCoT-GRPO from it with the four rewards, the generation reward by the mini COMPASS in-process, its
           text sampled at GRPO_TEXT_TEMPERATURE -> realsr_r1/mini/grpo ('mini')
    eval   held-out photographs (never trained on): the cold start, the GRPO model and bicubic in one table and
           one picture -> realsr_r1/mini/eval.{json,md,png}

    python -m realsr_r1.build_mini                 # everything (about 52 min on 2 CPU cores with nothing else running)
    python -m realsr_r1.build_mini --stage sft     # one stage (and what it needs must exist)
    python -m realsr_r1.build_mini --quick         # the whole chain with a few steps each, into WORK/quick_mini

Work files (checkpoints, logs, TensorBoard) go to --work; only the final presets go to --mini-dir.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import data
from common import training as T
from evaluation import evaluate
from mini import photos
from realsr_r1 import model as M
from realsr_r1 import train_realsr_r1 as R
from realsr_r1 import vlcot as V

STAGES = ("vq", "init", "sft", "grpo", "eval")
CROP = 48
"""HR crop side of the mini world: LR 12 px, codes 3x3 / 6x6 / 12x12 with the 4x VQ (model.MINI)."""
GRPO_TEXT_TEMPERATURE = 1.3
"""`grpo --text-temperature` of the mini build (the paper does not give its sampling temperature; image codes stay
at 1). The cold start writes its training photographs' texts almost surely (format 0.99 at temperature 1), so its
groups there carry no format advantage and GRPO at 1 lowered the held-out format; at 1.3 the training format is
about 0.8 and GRPO keeps the held-out one (README, "GRPO's text temperature")."""


@dataclass
class Budget:
    """Steps and sizes of one build (full or --quick)."""

    vq_steps: int = 5000
    vq_batch: int = 16
    sft_steps: int = 3000
    sft_batch: int = 8
    grpo_steps: int = 300
    grpo_batch: int = 4
    eval_crops: int = 128


FULL = Budget()
QUICK = Budget(vq_steps=20, sft_steps=20, grpo_steps=3, grpo_batch=2, eval_crops=4)


# =====================================================================================================
# Stage vq
# =====================================================================================================


def vq_batch(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, CROP, CROP) training images of the VQ from the TRAIN photographs: 1/2 crops showing most of a photo (as
    the chain's images do), 1/4 crops at every scale (textures), 1/4 degraded LRs bicubic-upscaled (as the prompt
    shows the LR)."""
    n_lr, n_tex = n // 4, n // 4
    whole = torch.stack([c for c, _ in R.photo_crops(photos.TRAIN, n - n_lr - n_tex, CROP, generator)])
    texture = photos.random_crops(photos.TRAIN, n_tex, CROP, generator)
    ex = R.draw_examples(photos.TRAIN, n_lr, CROP, 4, V.DEGRADATION_PRESETS["mini"], generator)
    lr = R.lr_image(torch.stack([e.lr for e in ex]), (CROP, CROP), "output")
    return torch.cat([whole, texture, lr])


def restart_dead_codes(vq, counts: torch.Tensor, latents: torch.Tensor, generator: torch.Generator) -> int:
    """Codes unused since the last restart take the direction of random latents of the batch (B, D, h, w); returns
    how many were restarted. (Not LlamaGen's: a small codebook trained from scratch on a CPU otherwise keeps a
    share of dead codes.)"""
    dead = (counts == 0).nonzero().flatten()
    if len(dead):
        z = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        pick = torch.randint(len(z), (len(dead),), generator=generator)
        with torch.no_grad():
            vq.quantize.embedding.weight[dead] = z[pick] + 0.01 * torch.randn(len(dead), z.shape[1], generator=generator)
    return len(dead)


@torch.no_grad()
def vq_report(vq, n: int = 64) -> dict:
    """Held-out round trip of the VQ: PSNR to the HR, LR consistency against the plain LR, codes in use."""
    g = torch.Generator().manual_seed(7)
    hr = torch.stack([c for c, _ in R.photo_crops(photos.HELDOUT, n, CROP, g)])
    codes = M.vq_encode(vq, hr)
    rec = M.vq_decode(vq, codes)
    lr = data.plain_degrade(hr, 0.8)
    return {"psnr": float(R.psnr(rec, hr).mean()), "lr_consistency": float(evaluate.lr_consistency(rec, lr, eight_bit=True).mean()),
            "codes_used": int(codes.unique().numel())}


VQ_LR = 1e-3
"""Peak AdamW learning rate of the mini VQ (LlamaGen: 1e-4 at batch 128 on GPUs; a 2e-4 build reached 19.3 dB in 1,500
steps, a 1e-3 pilot was faster), cosine-decayed to a tenth by the last step."""
VQ_LR_WEIGHT = 8.0
"""model.vq_loss's low-frequency term. Held-out LR consistency of the VQ's round trip (vq_report): 20.6 dB without it
(lr 2e-4, 1,500 steps), 23.8 dB with weight 4 (lr 1e-3, 1,500 steps), 25.6 dB with weight 8 and 5,000 steps (the
shipped VQ; the HR itself scores 29-30 dB on this check)."""


def vq_learning_rate(step: int, steps: int, peak: float = VQ_LR) -> float:
    """Cosine from `peak` at step 0 to peak / 10 at the last step (a function of the step: resume stays exact): the
    stage script's schedule (train_realsr_r1.cosine_lr, no warmup) over steps - 1, above a floor of a tenth."""
    return 0.1 * peak + 0.9 * R.cosine_lr(step, steps - 1, 0.0, peak)


def stage_vq(budget: Budget, mini: Path, work: Path) -> dict:
    """Train the VQ with checkpoints in WORK/vq (resumable); the result goes to MINI/vq."""
    dist_info = T.setup_distributed("cpu")
    vq = M.build_vq(M.MINI["vq"], seed=0).train()
    optimizer = torch.optim.AdamW(vq.parameters(), lr=VQ_LR, betas=(0.5, 0.9))  # LlamaGen's betas
    ckpt = work / "vq" / "checkpoints"
    found = T.resolve_resume("latest", ckpt)
    start = T.restore_training_checkpoint(found, vq, optimizer, dist_info)["step"] if found else 0
    counts = torch.zeros(vq.config.num_embeddings)
    log = work / "vq" / "losses.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    T.truncate_jsonl(log, start)
    t_start = time.time()
    for step in range(start, budget.vq_steps):
        g = R.step_generator(0, step, 0)
        images = vq_batch(budget.vq_batch, g)
        for group in optimizer.param_groups:
            group["lr"] = vq_learning_rate(step, budget.vq_steps)
        loss, stats, codes = M.vq_loss(vq, images, lr_weight=VQ_LR_WEIGHT)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        counts += torch.bincount(codes.flatten(), minlength=len(counts)).float()
        done = step + 1
        if done % 100 == 0 and done < budget.vq_steps * 0.9:  # restarts stop before the end
            stats["restarted"] = restart_dead_codes(vq, counts, M.vq_latents(vq, images).detach(), g)
            counts.zero_()
        with open(log, "a") as f:
            f.write(json.dumps({"step": done, **stats, "seconds": time.time() - t_start}) + "\n")
        if done % 50 == 0 or done == budget.vq_steps:
            print(f"[vq] step {done}/{budget.vq_steps} psnr {stats['psnr']:.2f} dB, "
                  f"downscaled {stats['lr_psnr']:.2f} dB "
                  f"({(time.time() - t_start) / (done - start):.2f} s/step)", flush=True)
            T.save_training_checkpoint(ckpt, done, vq, optimizer, dist_info, keep_last=1)
    vq.eval()
    M.save_vq(vq, mini / "vq")
    report = vq_report(vq)
    print(f"[vq] held-out round trip: {report}", flush=True)
    return report


# =====================================================================================================
# Stages init / sft / grpo / eval: the stage script with the mini settings
# =====================================================================================================


def stage_init(mini: Path, work: Path) -> None:
    """A random mini policy over the mini vocabulary whose realsr_r1.json names MINI/vq."""
    tokenizer = M.build_tokenizer(M.MINI["vq"]["num_embeddings"])
    model = M.build_policy(tokenizer, M.MINI["policy"], seed=0)
    layout = V.Layout.from_tokenizer(tokenizer, M.MINI["vq"]["num_embeddings"], M.MAX_GRIDS,
                                     position_stride=M.MINI_POSITION_STRIDE)
    meta = {"grid": 1, "num_codes": M.MINI["vq"]["num_embeddings"], "lr_size": "output",
            "position_stride": M.MINI_POSITION_STRIDE, "vq": str((mini / "vq").resolve())}
    vq = M.load_vq(str(mini / "vq"))
    M.save_policy(M.Policy(model, tokenizer, layout, vq, meta), work / "init")
    n = sum(p.numel() for name, p in model.named_parameters() if not M.is_unused(name))
    print(f"[init] mini policy: {n / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}", flush=True)


def run_stage_script(argv: list[str]) -> None:
    """The stage script in this process; its own errors stop the build with their one line."""
    code = R.main(argv)
    if code != 0:
        raise T.RunError(f"train_realsr_r1 {' '.join(argv[:1])} stopped with status {code}")


def copy_policy(src: Path, dst: Path) -> None:
    """A trained policy folder (without checkpoints and logs) into the mini folder, naming MINI/vq relatively."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    meta = json.loads((src / M.META_FILE).read_text())
    meta["vq"] = M.vq_reference((src / meta["vq"]).resolve(), dst)
    T.atomic_write_text(json.dumps(meta, indent=1), dst / M.META_FILE)


def stage_sft(budget: Budget, mini: Path, work: Path) -> None:
    run_stage_script(["sft", "--model", str(work / "init"), "--out", str(work / "sft"), "--data", "photos",
                      "--crop-size", str(CROP), "--degradation", "mini", "--lr-size", "output",
                      "--batch-size", str(budget.sft_batch), "--micro-batch", str(budget.sft_batch),
                      "--steps", str(budget.sft_steps), "--lr", "1e-3", "--warmup", "0.02",
                      "--save-every", "100", "--device", "cpu", "--resume", "latest"])
    copy_policy(work / "sft", mini / "sft")


def stage_grpo(budget: Budget, mini: Path, work: Path) -> None:
    run_stage_script(["grpo", "--model", str(mini / "sft"), "--out", str(work / "grpo"), "--data", "photos",
                      "--crop-size", str(CROP), "--degradation", "mini", "--batch-size", str(budget.grpo_batch),
                      "--group", "3", "--micro-batch", "12", "--steps", str(budget.grpo_steps), "--lr", "1e-4",
                      "--beta", "0.04", "--clip-range", "0.2", "--text-budget", "64",
                      "--text-temperature", str(GRPO_TEXT_TEMPERATURE),
                      "--generation-reward", "compass", "--reward-model", "mini",
                      "--save-every", "20", "--device", "cpu", "--resume", "latest"])
    copy_policy(work / "grpo", mini / "grpo")


def stage_eval(budget: Budget, mini: Path) -> None:
    torch.set_num_threads(1)  # as tests/test_realsr_r1.py reproduces the table (sampling is exact per thread count)
    # the shipped presets by their names (the table then names them, not this machine's folders)
    models = ["mini-sft", "mini"] if mini.resolve() == M.MINI_DIR.resolve() else [str(mini / "sft"), str(mini / "grpo")]
    run_stage_script(["eval", "--models", *models, "--crops", str(budget.eval_crops),
                      "--crop-size", str(CROP), "--degradation", "mini", "--text-budget", "64", "--device", "cpu",
                      "--out", str(mini / "eval")])


def done_marker(stage: str, mini: Path, work: Path) -> Path:
    """The file whose presence means `stage` is finished."""
    return {"vq": mini / "vq" / "model.safetensors", "init": work / "init" / "model.safetensors",
            "sft": mini / "sft" / "model.safetensors", "grpo": mini / "grpo" / "model.safetensors",
            "eval": mini / "eval.json"}[stage]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--stage", choices=STAGES, action="append", help="run only these stages (repeatable)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage, into WORK/quick_mini")
    parser.add_argument("--redo", action="store_true", help="run the chosen stages even when they are finished")
    parser.add_argument("--work", default="out/realsr_r1_mini", help="checkpoints, logs and TensorBoard of the build")
    parser.add_argument("--mini-dir", default=str(M.MINI_DIR), help="where the presets go (--quick: WORK/quick_mini)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads of the training stages (the shipped presets: 2; the sums, hence the "
                             "weights, differ with the thread count; eval always runs on 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else FULL
    work = Path(args.work) / ("quick" if args.quick else "full")
    mini = work.parent / "quick_mini" if args.quick else Path(args.mini_dir)
    stages = args.stage or list(STAGES)
    timings = {}
    for stage in STAGES:
        if stage not in stages:
            continue
        marker = done_marker(stage, mini, work)
        if marker.exists() and not args.redo:
            print(f"[build] {stage}: done ({marker}); --redo to run it again", flush=True)
            continue
        if args.redo and stage in ("sft", "grpo", "vq"):
            shutil.rmtree(work / stage, ignore_errors=True)
        t0 = time.time()
        print(f"[build] {stage} ...", flush=True)
        if stage == "vq":
            timings["vq_report"] = stage_vq(budget, mini, work)
        elif stage == "init":
            stage_init(mini, work)
        elif stage == "sft":
            stage_sft(budget, mini, work)
        elif stage == "grpo":
            stage_grpo(budget, mini, work)
        else:
            stage_eval(budget, mini)
        timings[stage] = round(time.time() - t0, 1)
        print(f"[build] {stage} finished in {timings[stage]:.0f} s", flush=True)
    T.atomic_write_text(json.dumps({"budget": vars(budget), "timings": timings}, indent=1),
                        work / f"build_{int(time.time())}.json")
    return 0


if __name__ == "__main__":
    T.run_script(main)
