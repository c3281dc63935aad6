"""Cold-start stage of OARS: flow-matching SFT of Qwen-Image-Edit-2509 on LR-HR pairs (paper §4, Eq.5).

    x_t = (1 - t) x_HR + t eps,   v = eps - x_HR,   L_SFT = E_{t~U(0,1), x_HR, eps} || v - v_theta(x_t, t | x_LR, c) ||^2

x_HR, eps and x_t live in the VAE's normalised, packed latent space; x_LR enters as the condition (the LR
upscaled 4x, seen by the VL text encoder and appended as condition latents, see backbone.py).

Tiny preset on a CPU (a minute); the mini preset's SFT is this command run on its base for 3500 steps
(mini/build_backbone.py), shipped as `--sft mini`:
    python train_sft.py --model tiny --hr-dir data/hr --crop-size 64 --steps 50 --lr 1e-3
    python train_sft.py --model mini --hr-dir data/hr --crop-size 64 --steps 3500 --batch-size 16 --lr 2e-4 --reuse 4
Full scale (paper: LSDIR, 512 px crops), 8 GPUs; --model defaults to Qwen/Qwen-Image-Edit-2509, and on GPUs
bf16 and gradient checkpointing are on by default:
    torchrun --nproc_per_node 8 train_sft.py --hr-dir LSDIR/HR --fsdp
    (--fsdp shards the 20B transformer with its float32 master weights and AdamW state, ~16 bytes/param, over
     the GPUs; rank 0 reads the checkpoint on the host and sends each rank its shards. Without --fsdp every
     GPU holds a replica, which fits only a LoRA: --lora-rank 64.)
Resume a killed run:  python train_sft.py ... --resume latest

Writes out/sft/transformer.safetensors (full transformer weights, or the LoRA merged into them; bfloat16 when
training in bf16, 41 GB for the 20B model), which `infer.py --sft out/sft` and `rl_fr.py --init sft` load;
checkpoints under out/sft/checkpoints/ (under --fsdp every rank writes its own shards, no gather); TensorBoard
scalars under out/sft/tb/; LR | SR | HR grids under out/sft/samples/.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import backbone as B
from common import training as T
from common.data import DEGRADATIONS, HRFolderDataset, PairedFolderDataset, collate, save_image


@dataclass
class Args:
    model: str = B.REAL_MODEL
    """Qwen/Qwen-Image-Edit-2509 (paper) or its local diffusers folder; 'mini' (the trained laptop base) or 'tiny'"""
    hr_dir: str | None = None
    """HR folder, degraded on the fly (Real-ESRGAN second order, data.py)"""
    degradation: str = "realesrgan"
    """synthetic LR of --hr-dir: 'realesrgan' (the paper's Real-ESRGAN x4plus parameters, sized for 256 -> 64 px
    crops) or 'mini' (data.MINI_DEGRADATION: the same pipeline scaled to 64 -> 16 px crops)"""
    lr_dir: str | None = None
    """LR folder paired with --hr-dir by file name (then no synthetic degradation)"""
    plain_fraction: float = 0.0
    """share of training pairs whose LR is a plain Gaussian blur (sigma from the two flags below) + bicubic
    downscale instead of the Real-ESRGAN degradation (data.plain_degrade); paper: 0, Real-ESRGAN only"""
    plain_sigma_min: float = 0.6
    """the plain LR's blur sigma is drawn from U(--plain-sigma-min, --plain-sigma-max) HR px"""
    plain_sigma_max: float = 1.8
    """upper end of the plain LR's blur sigma (HR px)"""
    out: str = "out/sft"
    """run folder: transformer.safetensors (the SFT weights), checkpoints/, tb/, samples/, train_log.json"""
    crop_size: int = 512
    """HR crop in pixels (paper: 512 x 512, 4x SR)"""
    scale: int = 4
    """upscaling factor (the paper's 4x)"""
    batch_size: int = 1
    """per process"""
    steps: int = 10000
    """optimizer steps"""
    lr: float = 1e-5
    """AdamW learning rate (the paper does not give the SFT value; 1e-5 is usual for full fine-tuning)"""
    weight_decay: float = 1e-4
    """paper §5.1 gives 1e-4 for RL; reused here"""
    warmup_steps: int = 100
    """linear learning-rate warm-up steps (paper silent)"""
    lr_schedule: str = "constant"
    """after the warm-up: 'constant' or 'cosine' (decays to 0 at --steps; a short run's last samples settle
    instead of jumping between checkpoints) (paper silent)"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (paper silent)"""
    timestep_sampling: str = "uniform"
    """'uniform' (t ~ U(0,1), Eq.5 as written) | 'logit_normal' | 'shifted' (diffusers' SD3/Qwen alternatives)"""
    lora_rank: int = 0
    """0 = full fine-tuning (paper); >0 trains a LoRA of this rank (alpha = 2*rank) and merges it at the end"""
    bf16: bool | None = None
    """bfloat16: frozen text encoder and VAE in bf16, the transformer's forward under bf16 autocast (FSDP: bf16
    compute, float32 master weights and gradient reduction); default: on when training on a GPU"""
    gradient_checkpointing: bool | None = None
    """recompute each block's activations in the backward pass; default: on for the real model, off for mini/tiny"""
    fsdp: bool = False
    """shard the transformer over the torchrun processes with FSDP2 (full fine-tuning of the 20B model
    does not fit one GPU with AdamW); without it, torchrun replicates it with DDP"""
    offload_text_encoder: bool = False
    """keep the frozen text encoder on the host between conditionings (it moves to the GPU for each batch's,
    ~17 GB in bf16 over PCIe; it is not run on the CPU)"""
    prompt: str = B.DEFAULT_PROMPT
    """the "enhance" instruction c of Eq.5"""
    seed: int = 0
    """seed of the data order, the degradations and the noise (every rank adds its rank)"""
    log_every: int = 10
    """TensorBoard scalars every N steps"""
    sample_every: int = 500
    """write an LR | SR | HR grid every N steps (0 = never)"""
    sample_steps: int = 40
    """Euler steps of those sample pictures"""
    save_every: int = 1000
    """checkpoint every N steps (and at the last)"""
    keep_last: int = 3
    """checkpoints kept"""
    resume: str | None = None
    """'latest' (the newest checkpoint of --out) or a checkpoint directory"""
    overwrite: bool = False
    """start over in an --out folder that holds a run (deletes its checkpoints, logs and weights); without it such a
    folder is refused unless --resume"""
    max_nonfinite: int = 10
    """stop after this many NaN/Inf losses (each one skips its step)"""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the training process)"""
    reuse: int = 1
    """train on each encoded LR-HR pair this many times on average (training.ReusePool): the frozen text
    encoder, VAE and degradation run once per `reuse` steps. 1 = every step a fresh batch (paper setting);
    the mini SFT uses 4 (on a CPU the encoders cost more than the transformer step)"""


def parse_args(argv: list[str] | None = None) -> Args:
    args, parser = T.parse_dataclass_args(Args, argv, __doc__.split("\n")[0])
    if not args.hr_dir:
        parser.error("--hr-dir is required (an HR folder; add --lr-dir for paired LR images)")
    if not 0.0 <= args.plain_fraction <= 1.0:
        parser.error(f"--plain-fraction {args.plain_fraction}: choose a share in [0, 1]")
    if args.plain_fraction and args.lr_dir:
        parser.error("--plain-fraction degrades HR images on the fly; with --lr-dir the LR images are given")
    if args.degradation not in DEGRADATIONS:
        parser.error(f"--degradation {args.degradation}: choose one of {', '.join(DEGRADATIONS)}")
    if args.degradation != "realesrgan" and args.lr_dir:
        parser.error("--degradation degrades HR images on the fly; with --lr-dir the LR images are given")
    if not 0 < args.plain_sigma_min <= args.plain_sigma_max:
        parser.error(f"--plain-sigma-min/max {args.plain_sigma_min}/{args.plain_sigma_max}: need 0 < min <= max")
    if args.lr_schedule not in ("constant", "cosine"):
        parser.error(f"--lr-schedule {args.lr_schedule}: choose constant or cosine")
    if args.fsdp and args.lora_rank:
        parser.error("--fsdp shards a full fine-tune; a LoRA (--lora-rank) fits without sharding: drop --fsdp")
    if args.timestep_sampling not in ("uniform", "logit_normal", "shifted"):
        parser.error(f"--timestep-sampling {args.timestep_sampling}: choose uniform, logit_normal or shifted")
    for name in ("steps", "batch_size", "save_every", "keep_last", "reuse", "scale", "crop_size", "sample_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not args.lr > 0:
        parser.error(f"--lr {args.lr}: must be > 0")
    if args.crop_size % (4 * args.scale):
        parser.error(f"--crop-size {args.crop_size}: must be a multiple of 4 x --scale ({4 * args.scale})")
    return args


def sample_timesteps(n: int, mode: str, generator: torch.Generator, shift: float = 3.0) -> torch.Tensor:
    """t in (0,1) for n samples. 'uniform' is Eq.5 as written; the others are diffusers' SD3 choices."""
    if mode == "uniform":
        return torch.rand(n, generator=generator)
    if mode == "logit_normal":  # mean 0, std 1 in logit space: more weight on the middle of the path
        return torch.sigmoid(torch.randn(n, generator=generator))
    u = torch.rand(n, generator=generator)  # 'shifted': t' = s t / (1 + (s - 1) t), more weight on noise
    return shift * u / (1 + (shift - 1) * u)


def load_for_training(args: Args, dist_info: T.DistInfo, sharded: bool) -> B.Backbone:
    """The backbone as this process trains it. Frozen text encoder and VAE in bf16 when training in bf16 (on the
    host with --offload-text-encoder). Under FSDP2 ONE full copy of the transformer per node, on the host: rank 0
    reads it there, the others build it on the meta device, and every rank receives its shards from rank 0
    (training.shard_from_rank0) instead of rank 0 first loading all 82 GB of float32 weights onto its GPU."""
    return B.load_backbone(args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32, device=dist_info.device,
                           text_encoder_device="cpu" if args.offload_text_encoder else None,
                           transformer_on_meta=sharded and not dist_info.is_main,
                           transformer_device="cpu" if sharded else None)


def lr_factor(step: int, args: Args) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): linear warm-up over --warmup-steps, then
    1 (constant) or a cosine from 1 down to 0 at --steps."""
    factor = min(1.0, (step + 1) / max(1, args.warmup_steps))
    if args.lr_schedule == "cosine":
        factor *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps)))
    return factor


def flow_matching_loss(transformer, cond: B.Condition, x0: torch.Tensor, generator: torch.Generator,
                       mode: str = "uniform", autocast: bool = False) -> torch.Tensor:
    """Eq.5 for a batch: x0 (B,N,64) clean HR tokens, cond batched to B -> scalar loss."""
    b = x0.shape[0]
    t = sample_timesteps(b, mode, generator).to(x0.device)              # t ~ U(0,1)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)      # eps ~ N(0, I)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps          # x_t = (1-t) x_HR + t eps
    v_target = eps - x0                                                  # v = eps - x_HR
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=autocast):
        v_pred = B.velocity(transformer, x_t, t, cond)                   # v_theta(x_t, t | x_LR, c)
    return (v_pred.float() - v_target).pow(2).mean()                     # || v - v_theta ||^2


def main(argv: list[str] | None = None) -> int | None:
    args = parse_args(argv)
    # ------------------------------------------------------------------ setup (plumbing)
    dist_info = T.setup_distributed()
    generator = T.seed_everything(args.seed, dist_info.rank)   # per-rank noise and timesteps
    if args.bf16 is None:
        args.bf16 = dist_info.device.type == "cuda"
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = args.model not in ("tiny", "mini")
    out = Path(args.out)
    ckpt_root = out / "checkpoints"
    # a finished or interrupted run in --out is never replaced by accident (--resume / --overwrite)
    T.claim_run(out, args.resume, args.overwrite, out / "transformer.safetensors", dist_info, asdict(args))

    if args.lr_dir:
        dataset = PairedFolderDataset(args.lr_dir, args.hr_dir, crop_size=args.crop_size, scale=args.scale,
                                      flip=True, seed=args.seed)
    else:
        dataset = HRFolderDataset(args.hr_dir, crop_size=args.crop_size, scale=args.scale, seed=args.seed,
                                  degradation=DEGRADATIONS[args.degradation], plain_fraction=args.plain_fraction,
                                  plain_sigma=(args.plain_sigma_min, args.plain_sigma_max))
    dataset.check()  # one error listing every unreadable / too small / unmatched file, before any training

    sharded = args.fsdp and dist_info.world_size > 1
    bb = load_for_training(args, dist_info, sharded)
    transformer = bb.transformer
    if not args.lora_rank and not (sharded and not dist_info.is_main):
        transformer.float()  # full fine-tuning keeps float32 master weights (bf16 compute via autocast / FSDP)
    if args.lora_rank:
        B.add_lora(transformer, rank=args.lora_rank, alpha=2 * args.lora_rank)
        params = [p for n, p in transformer.named_parameters() if "lora_" in n]
        for p in params:  # the LoRA trains in float32 on the (bf16) base
            p.data = p.data.float()
            p.requires_grad_(True)
    else:
        transformer.requires_grad_(True)
        params = list(transformer.parameters())
    transformer.train()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    if sharded:  # FSDP2: each MMDiT block, then the root; parameters become sharded DTensors
        T.shard_from_rank0(transformer, list(transformer.transformer_blocks), dist_info, args.bf16)
        params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args))

    start_step, losses = 0, []  # losses: one per step since step 1, kept in the checkpoints across resumes
    resume_from = T.resolve_resume(args.resume, ckpt_root)
    if resume_from is not None:
        state = T.restore_training_checkpoint(resume_from, transformer, optimizer, dist_info, generator, scheduler,
                                              sharded)
        start_step, losses = state["step"], state.get("losses", [])
        if dist_info.is_main:
            print(f"resumed from {resume_from} at step {start_step}")

    # DDP replicas need find_unused_parameters: the last block's text-stream outputs get no gradient
    model = DDP(transformer, find_unused_parameters=True) if dist_info.world_size > 1 and not sharded else transformer
    writer = T.summary_writer(out / "tb", start_step) if dist_info.is_main else None  # purges a killed run's tail
    guard = T.NonFiniteGuard(args.max_nonfinite)

    def encode(batch: dict) -> list[tuple[B.Condition, torch.Tensor]]:
        """One loader batch -> one (condition, x_HR latent tokens) item per LR-HR pair."""
        lr_imgs, hr_imgs = batch["lr"].to(bb.device), batch["hr"].to(bb.device)
        with torch.no_grad(), B.text_encoder_on(bb, dist_info.device) if args.offload_text_encoder else nullcontext():
            # 1. condition (x_LR, c): once per LR image, frozen text encoder and VAE
            conds = [B.encode_condition(bb, x, args.prompt, args.scale) for x in lr_imgs]
            # 2. x_HR in the latent space the velocity lives in
            x0 = B.pack_latents(B.vae_encode(bb.vae, hr_imgs)).float()
        return list(zip(conds, x0.split(1)))

    pool = T.ReusePool(args.reuse, lambda: next(batches)[1], encode, generator)
    batches = T.infinite_batches(dataset, args.batch_size, dist_info, args.seed, pool.first_batch(start_step),
                                 args.num_workers, collate)
    pool.prefill(start_step)  # a resumed run re-encodes the pairs its pool held (no-op for --reuse 1)

    def save(step: int) -> None:
        # all ranks hold identical weights under DDP; every rank contributes its noise generator state
        T.save_training_checkpoint(ckpt_root, step, transformer, optimizer, dist_info, generator, scheduler,
                                   keep=trainable.__contains__, keep_last=args.keep_last, sharded=sharded,
                                   losses=losses)

    # ------------------------------------------------------------------ the cold-start loop (Eq.5)
    stop = T.StopOnSignal()  # Ctrl-C / SIGTERM: checkpoint at the end of the step, then the resume command
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="SFT",
               disable=not dist_info.is_main)
    step = start_step
    for step in bar:
        items = pool(step)  # 1-2. encoded (x_LR, c) conditions and x_HR latents (see encode above)
        cond, x0 = B.stack_pairs(items)
        # 3-5. x_t, v = eps - x_HR, ||v - v_theta||^2
        loss = flow_matching_loss(model, cond, x0, generator, args.timestep_sampling, args.bf16)
        optimizer.zero_grad(set_to_none=True)
        if not guard.ok(loss):  # NaN/Inf: skip the step, count it, stop after --max-nonfinite
            continue
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        scheduler.step()

        # ------------------------------------------------------------------ logging, samples, checkpoints
        loss_value = float(T.all_reduce_mean(loss.detach()))
        losses.append(loss_value)
        done = step + 1
        if dist_info.is_main:
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if done % args.log_every == 0 or done == args.steps:
                writer.add_scalar("train/loss", loss_value, done)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], done)
                writer.add_scalar("train/grad_norm", float(grad_norm), done)
                writer.add_scalar("train/nonfinite_skipped", guard.skipped, done)
                writer.flush()
        if args.sample_every and done % args.sample_every == 0 and (dist_info.is_main or sharded):
            # under FSDP2 every rank takes part in the forward passes; rank 0 writes the picture
            write_sample_grid(bb, pool.last_raw["lr"][0], pool.last_raw["hr"][0], args,
                              out / "samples" / f"step_{done:06d}.png", dist_info.is_main)
        stopping = stop.requested()
        if done % args.save_every == 0 or done == args.steps or stopping:
            save(done)
        if stopping:
            bar.close()
            return T.stopped(stop, writer, dist_info)
    stop.restore()

    # ------------------------------------------------------------------ final weights for infer.py / rl_fr.py
    if not sharded:  # DDP replicas must be identical (FSDP2 shards differ by design)
        checksum = T.check_ranks_in_sync(params)
        if dist_info.is_main and dist_info.world_size > 1:
            print(f"{dist_info.world_size} ranks in sync (parameter checksum {checksum:.6f})")
    if args.lora_rank:  # the SFT output is always full weights: merge the LoRA in
        transformer.fuse_lora()
        transformer.unload_lora()
    final, _ = T.gather_full_state(transformer, None)  # collective under FSDP2: rank 0 gets the full weights
    if dist_info.is_main:
        export = torch.bfloat16 if args.bf16 else torch.float32  # bf16: the checkpoint's own precision, half the file
        T.atomic_save_safetensors({k: v.to(export) for k, v in final.items()}, out / "transformer.safetensors")
        T.atomic_write_text(json.dumps({"losses": losses, "start_step": start_step,
                                        "nonfinite_skipped": guard.skipped, "time": time.time()}),
                            out / "train_log.json")
        print(f"wrote {out / 'transformer.safetensors'}")
        writer.close()
    T.cleanup_distributed()


@torch.no_grad()
def write_sample_grid(bb: B.Backbone, lr: torch.Tensor, hr: torch.Tensor, args: Args, path: Path,
                      write: bool = True) -> None:
    """LR (bicubic to HR size) | SR | HR side by side."""
    was_training = bb.transformer.training
    bb.transformer.eval()
    sr = B.super_resolve(bb, lr, args.sample_steps, generator=torch.Generator().manual_seed(0),
                         prompt=args.prompt, scale=args.scale)[0]
    bb.transformer.train(was_training)
    if write:
        grid = torch.cat([B.upscale(lr[None].float(), args.scale)[0].cpu(), sr.cpu(), hr.float().cpu()], dim=-1)
        save_image(grid, path)


if __name__ == "__main__":
    T.run_script(main)
