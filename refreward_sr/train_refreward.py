"""RefReward-SR: GRPO training of an LR-conditioned pairwise reward model (Qwen3-VL); its data and evaluation.

The second seed paper trains its MLLM judge with GRPO on LR-conditioned pairwise rankings (RefSR-18K). This
script does it with this project's model doors, data I/O and logging. Three subcommands:

    pairs   a COMPASS annotation JSONL (train_compass.py annotate) -> a pairs JSONL: SRs of one LR whose label
            rewards (Eq.4) differ by at least --margin, the better one preferred, A/B drawn at random
    train   (optional) warm-up: supervised steps on `<think></think><answer>X</answer>`, X a RANDOM verdict (a
            format warm-up: the form, nothing about preference) or with --warmup-verdicts labelled the correct
            one (a supervised judge, not in the seed paper; `readings`: after both candidates' label rewards in
            the think, `<think>A 3.1 B 1.2</think>`); then GRPO:
              1. per step and process, `--prompts` pairs, each shown in a random A/B order;
              2. G answers sampled per prompt (temperature --temperature) from the current model;
              3. rule rewards: 1 for the correct verdict + 0.2 for a well-formed answer (refreward.rule_reward);
              4. group-normalised advantages A = (R - mean_G) / (std_G + 1e-4)   (flow_grpo.group_advantages);
              5. per answer token the PPO-clipped surrogate max(-A ratio, -A clip(ratio, 1 +- eps)) with ratio
                 = pi / pi_old (flow_grpo.clipped_surrogate) + beta x k3 KL to the reference (the model before
                 GRPO), averaged over each answer's tokens, then over answers; one AdamW step.
    eval    held-out pairs, both orders asked: accuracy, invalid answers and position-inconsistent pairs
            (counted and excluded, never a tie).

Commands (tiny preset on a CPU; mini: `--model` = a mini COMPASS-sized folder, see mini/build_compass.py):

    python train_refreward.py pairs --compass data/compass.jsonl --out data/pairs.jsonl
    python train_refreward.py train --model tiny --data data/pairs.jsonl --out out/refreward --steps 50
    torchrun --nproc_per_node 8 train_refreward.py train --data RefSR/pairs.jsonl --out out/refreward --steps 2000
        # full scale: Qwen3-VL-8B-Instruct (the default --model), sharded by FSDP2 over the GPUs; --resume latest
    python train_refreward.py eval --model out/refreward --data data/pairs_heldout.jsonl

Writes OUT/ (save_pretrained: model + processor, loads with refreward.load_refreward and `vllm serve`),
OUT/checkpoints/, OUT/tb/ and OUT/rewards.jsonl (one line per step).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from baselines import flow_grpo
from common import training as T
from common.data import load_image, to_pil
from common.vl_model import shard_vl_model
from refreward_sr import refreward as RR
from train_compass import load_records


@dataclass
class TrainArgs:
    data: str = ""
    """(required) pairs JSONL (train_refreward.py pairs)"""
    root: str = ""
    """folder the JSONL paths are relative to (default: the JSONL's folder)"""
    out: str = "out/refreward"
    """output folder: the judge (save_pretrained), checkpoints/, tb/, rewards.jsonl"""
    model: str = "Qwen/Qwen3-VL-8B-Instruct"
    """the initial judge: Qwen/Qwen3-VL-8B-Instruct (the seed paper's size) or a folder; 'mini' (continue the shipped
    mini RefReward) or 'tiny'"""
    steps: int = 200
    """GRPO steps (after the warm-up)"""
    warmup_steps: int = 0
    """warm-up steps first: supervised `<think></think><answer>X</answer>` (X and the think by --warmup-verdicts)"""
    warmup_verdicts: str = "random"
    """the warm-up's X: 'random' (a format warm-up: the answer's form, nothing about preference; the seed paper
    trains the judge by GRPO alone) or 'labelled' (the pair's correct verdict in the order shown: a supervised
    judge before GRPO, for a model too small to sample correct answers often enough for GRPO to start from) or
    'readings' (the correct verdict after both candidates' label rewards in the think, `<think>A 3.1 B 1.2</think>`:
    pairs with score_a/score_b, as `pairs` writes them; the mini judge learns a verdict after its two readings,
    not a verdict alone: mini/README.md)"""
    prompts: int = 4
    """pairs per step and process"""
    group: int = 8
    """G answers sampled per pair (GRPO's group)"""
    lr: float = 1e-6
    """AdamW learning rate (DeepSeekMath GRPO: 1e-6)"""
    warmup_lr: float = 1e-3
    """learning rate of the format warm-up"""
    beta: float = 0.04
    """weight of the k3 KL to the reference (DeepSeekMath GRPO: 0.04)"""
    clip_range: float = 0.2
    """PPO clip of the per-token ratio (DeepSeekMath / PPO: 0.2)"""
    temperature: float = 1.0
    """sampling temperature of the GRPO answers"""
    max_new_tokens: int = 48
    """longest answer sampled (it ends at its first </answer>)"""
    format_weight: float = 0.2
    """rule reward of a well-formed answer (a correct verdict earns 1 more)"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    freeze_vision: bool = False
    """keep the vision tower (model.visual) as loaded; only the language model learns to compare (paper silent:
    off). A judge started from a COMPASS keeps what its tower sees"""
    seed: int = 0
    """seed of the pairs, their A/B order and the sampling"""
    save_every: int = 50
    """checkpoint every N steps (and at the last)"""
    keep_last: int = 2
    """checkpoints kept"""
    resume: str = ""
    """'latest' or a checkpoint folder"""
    overwrite: bool = False
    """start over in an --out folder that holds a run (deletes its checkpoints, logs and model); without it such a
    folder is refused unless --resume"""
    device: str = "auto"
    """cuda | cpu | auto"""
    bf16: str = "auto"
    """bfloat16 compute: on | off | auto (on with CUDA); under FSDP2 float32 master weights and AdamW state"""
    micro_batch: int = 8
    """answers per forward/backward of the GRPO update (gradients accumulate over the step's --prompts x --group
    answers; 32 answers of ~900 tokens at once would need ~90 GB per GPU for the 8B: scale/estimate.py)"""
    gradient_checkpointing: str = "auto"
    """recompute each layer's activations in the backward pass: on | off | auto (on for a model that is not
    'tiny' or 'mini')"""


def load_images(pair: RR.Pair, root: Path):
    return tuple(to_pil(load_image(root / p)) for p in (pair.lr, pair.sr_a, pair.sr_b))


def prompt_of(pair: RR.Pair, root: Path, swap: bool) -> tuple[list[dict], str]:
    """The conversation of one pair (A and B swapped when `swap`) and the correct verdict."""
    lr, a, b = load_images(pair, root)
    truth = pair.preferred.upper()
    if swap:
        a, b, truth = b, a, "B" if truth == "A" else "A"
    return RR.build_pair_messages(lr, a, b), truth


def warmup_think(pair: RR.Pair, swap: bool, verdicts: str) -> str:
    """The think of a warm-up answer: empty, or with --warmup-verdicts readings both candidates' label rewards in
    the order shown (A and B swapped when `swap`)."""
    if verdicts != "readings":
        return ""
    a, b = (pair.score_b, pair.score_a) if swap else (pair.score_a, pair.score_b)
    return RR.readings(a, b)


def verdict_position(tok, think: str) -> int:
    """Index of the verdict token in the answer with this think: the first token where the A and B answers differ."""
    a, b = (tok.encode(RR.format_verdict(v, think), add_special_tokens=False) for v in "AB")
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def answer_logprobs(model, batch: dict, prompt_len: int, completion: torch.Tensor) -> torch.Tensor:
    """log p of each completion token (B,T) given the prompt batch (left-padded) and the completion."""
    ids = torch.cat([batch["input_ids"], completion], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(completion)], dim=1)
    extra = {k: v for k, v in batch.items() if k in ("pixel_values", "image_grid_thw")}
    if "mm_token_type_ids" in batch:  # answer tokens are text: M-RoPE needs the type of every position
        extra["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
    logits = model(input_ids=ids, attention_mask=mask, **extra).logits[:, prompt_len - 1:-1]
    return RR.token_log_probs(logits, completion)


def completion_mask(completion: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """1 on the answer tokens up to and including the first end-of-turn, 0 after it and on padding: an answer
    that ended at its `</answer>` (a stop string) is padded from there on. The pad token is never sampled
    (the sampling suppresses it), so every pad is padding."""
    is_eos = (completion == eos_id).int()
    after = (torch.cumsum(is_eos, dim=1) - is_eos) > 0
    return (~after & (completion != pad_id)).float()


def train(args: TrainArgs) -> Path | int:
    dist_info = T.setup_distributed(args.device)
    device, sharded = dist_info.device, dist_info.world_size > 1
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and device.type == "cuda")
    T.seed_everything(args.seed, dist_info.rank)
    root = Path(args.root) if args.root else Path(args.data).parent
    pairs = RR.load_pairs(args.data, root)  # every bad record / missing image named before training
    if args.warmup_verdicts == "readings" and args.warmup_steps and any(p.score_a is None for p in pairs):
        raise ValueError(f"--warmup-verdicts readings: {args.data} has pairs without score_a/score_b (write them with "
                         "`train_refreward.py pairs --compass <labels>.jsonl`)")
    out = Path(args.out)
    ckpt_root = out / "checkpoints"
    # a finished or interrupted run in --out is never replaced by accident (--resume / --overwrite)
    T.claim_run(out, args.resume, args.overwrite, out / "config.json", dist_info, asdict(args))
    # Under torchrun the policy (float32 master weights + AdamW, ~16 bytes/parameter: 140 GB for the 8B) and the
    # frozen reference are sharded by FSDP2 over the ranks, loaded once per node (rank 0 on the host, the
    # others on the meta device, common.vl_model.shard_vl_model); on one process they are plain modules
    model, processor = RR.load_refreward(args.model, device="cpu", on_meta=sharded and not dist_info.is_main)
    reference = None
    if args.beta > 0:  # the policy before GRPO, frozen: the warmed-up model, saved once (below)
        reference, _ = RR.load_refreward(args.model, device="cpu", on_meta=sharded and not dist_info.is_main)
        reference.eval().requires_grad_(False)
    model.config.use_cache = False
    if args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto" and args.model not in ("tiny", "mini")):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train().requires_grad_(True)
    if args.freeze_vision:  # before sharding: FSDP2 keeps requires_grad per parameter
        model.model.visual.requires_grad_(False)
    for module in (model, reference):
        if module is not None and sharded:
            shard_vl_model(module, dist_info, bf16)
        elif module is not None:
            module.to(device)
    reference_file = out / "reference.safetensors"
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: FSDP2 swaps the Parameters
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    total = args.warmup_steps + args.steps
    start = 0
    found = T.broadcast_object(T.resolve_resume(args.resume or None, ckpt_root) if dist_info.is_main else None)
    if found is not None:
        start = T.restore_training_checkpoint(found, model, optimizer, dist_info, sharded=sharded)["step"]
        if dist_info.is_main:
            print(f"[train] resumed from {found} at step {start}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not sharded)  # FSDP2 casts itself
    log = out / "rewards.jsonl"
    writer = None
    if dist_info.is_main:
        writer = T.summary_writer(out / "tb", start)
        if start == 0:  # a fresh run: no log, no reference of an earlier run
            log.unlink(missing_ok=True)
            reference_file.unlink(missing_ok=True)
        T.truncate_jsonl(log, start)
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    # the answer's generation settings (RR.answer_generation_kwargs), and the pad token never sampled
    # where a warm-up answer's verdict sits, counted from its end: `</answer>` and the end token follow it whatever
    # the think, so the distance is found once, not per answer and step
    after_verdict = (len(tok.encode(RR.format_verdict("A") + "<|im_end|>", add_special_tokens=False))
                     - verdict_position(tok, ""))
    sampling = RR.answer_generation_kwargs(tok)
    sampling.update(suppress_tokens=[*sampling["suppress_tokens"], tok.pad_token_id], pad_token_id=tok.pad_token_id)
    from tqdm import tqdm

    stop = T.StopOnSignal()  # Ctrl-C / SIGTERM: checkpoint at the end of the step, then the resume command
    for step in tqdm(range(start, total), initial=start, total=total, desc="refreward", disable=not dist_info.is_main):
        # the pairs, A/B orders and sampling noise of this step and process: functions of (seed, step, rank)
        rng = random.Random(args.seed * 1_000_003 + step * 1009 + dist_info.rank)
        chosen = [pairs[rng.randrange(len(pairs))] for _ in range(args.prompts)]
        swaps = [rng.random() < 0.5 for _ in chosen]
        prompts = [prompt_of(p, root, swap) for p, swap in zip(chosen, swaps)]
        for group in optimizer.param_groups:
            group["lr"] = args.warmup_lr if step < args.warmup_steps else args.lr
        optimizer.zero_grad(set_to_none=True)
        grpo_starts = step == args.warmup_steps or (step == start and step > args.warmup_steps)  # or resumes
        if reference is not None and grpo_starts:
            if not T.broadcast_object(reference_file.exists() if dist_info.is_main else None):
                weights = T.gather_full_state(model, None)[0]  # the model as GRPO starts (after the warm-up)
                if dist_info.is_main:
                    T.atomic_save_safetensors(weights, reference_file)
                T.barrier()
            weights = load_file(str(reference_file)) if dist_info.is_main or not sharded else {}
            T.restore_full_state(reference, None, weights, {}, sharded)
        if step < args.warmup_steps:  # warm-up: teacher-forced answer, a random or the correct verdict
            verdicts = [truth if args.warmup_verdicts != "random" else rng.choice("AB") for _, truth in prompts]
            thinks = [warmup_think(p, swap, args.warmup_verdicts) for p, swap in zip(chosen, swaps)]
            answers = [RR.format_verdict(v, t) + "<|im_end|>" for v, t in zip(verdicts, thinks)]
            batch = processor.apply_chat_template([m for m, _ in prompts], add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt",
                                                  processor_kwargs={"padding": True, "padding_side": "left"}).to(device)
            encoded = [tok.encode(a, add_special_tokens=False) for a in answers]  # readings: lengths may differ
            width = max(map(len, encoded))
            completion = torch.tensor([e + [tok.pad_token_id] * (width - len(e)) for e in encoded], device=device)
            answer_mask = torch.tensor([[1.0] * len(e) + [0.0] * (width - len(e)) for e in encoded], device=device)
            with autocast:
                logprobs = answer_logprobs(model, batch, batch["input_ids"].shape[1], completion)
            loss = -RR.masked_mean(logprobs, answer_mask).mean()
            # the verdict is one token of the answer (of 34 with the mini byte tokenizer): the mean above
            # falls with the format alone, so the verdict's own loss and accuracy are logged beside it
            at = [len(e) - after_verdict for e in encoded]
            verdict = logprobs.detach()[torch.arange(len(at)), at]
            stats = {"warmup_loss": float(loss.detach()), "warmup_verdict_nll": float(-verdict.mean()),
                     "warmup_verdict_acc": float((verdict > math.log(0.5)).float().mean())}
        else:
            # 1-2. G sampled answers per pair (each prompt repeated G times)
            conversations = [m for m, _ in prompts for _ in range(args.group)]
            truths = [t for _, t in prompts for _ in range(args.group)]
            batch = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt",
                                                  processor_kwargs={"padding": True, "padding_side": "left"}).to(device)
            prompt_len = batch["input_ids"].shape[1]
            torch.manual_seed(args.seed * 1_000_003 + step * 1009 + dist_info.rank)
            model.eval()
            # synced_gpus: FSDP2 ranks run forwards until the last rank's answers end; the root gathered up front
            # (generate encodes the images before its first forward: training.root_unsharded)
            with torch.no_grad(), autocast, T.root_unsharded(model, sharded):
                sequences = model.generate(**batch, do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0,
                                           max_new_tokens=args.max_new_tokens, synced_gpus=sharded, **sampling)
            model.train()
            completion = sequences[:, prompt_len:]
            mask = completion_mask(completion, eos, tok.pad_token_id)
            texts = tok.batch_decode(completion)
            # 3-4. rule rewards and group-normalised advantages
            rewards = torch.tensor([RR.rule_reward(t, truth, args.format_weight) for t, truth in zip(texts, truths)])
            ids = torch.arange(len(prompts)).repeat_interleave(args.group)
            advantages = flow_grpo.group_advantages(rewards, ids, std_mode="group", eps=1e-4).to(device)
            # 5. clipped surrogate per token, --micro-batch answers at a time (each micro-batch's prompts encoded
            #    on their own; gradients accumulate). The old policy is the sampling policy, i.e. exactly this model
            #    before its one update of the step, so its log-probabilities are the current ones, detached
            #    (no second forward pass; the ratio is 1 and only its gradient drives the step)
            n, total_loss, kl, deviation = len(conversations), 0.0, 0.0, 0.0
            for i in range(0, n, args.micro_batch):
                part = slice(i, i + args.micro_batch)
                sub = processor.apply_chat_template(conversations[part], add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt", processor_kwargs={
                                                        "padding": True, "padding_side": "left"}).to(device)
                if sharded:  # reduce-scatter the gradients once, after the last micro-batch
                    model.set_requires_gradient_sync(i + args.micro_batch >= n)
                with autocast:
                    new = answer_logprobs(model, sub, sub["input_ids"].shape[1], completion[part])
                old = new.detach()
                per_token = flow_grpo.clipped_surrogate(new, old, advantages[part, None], args.clip_range)
                ref = old  # no reference (--beta 0): the KL below reads 0
                if reference is not None:
                    with torch.no_grad(), autocast:
                        ref = answer_logprobs(reference, sub, sub["input_ids"].shape[1], completion[part])
                    per_token = per_token + args.beta * RR.kl_k3(new, ref)
                part_loss = RR.masked_mean(per_token, mask[part]).sum() / n  # the mean over all n answers
                part_loss.backward()  # FSDP2 averages the gradients over the ranks in its reduce-scatter
                total_loss += float(part_loss.detach())
                kl += float(RR.masked_mean(RR.kl_k3(old, ref), mask[part]).sum()) / n
                deviation = max(deviation, float(((new.detach() - old).exp() - 1).abs().mul(mask[part]).max()))
            loss = torch.tensor(total_loss)
            verdicts = [RR.parse_verdict(t) for t in texts]
            stats = {"reward_mean": float(rewards.mean()), "accuracy": float(sum(v == t for v, t in zip(verdicts, truths))
                                                                               / len(texts)),
                     "format_rate": float(sum(v is not None for v in verdicts) / len(texts)),
                     "kl": kl, "ratio_max_deviation": deviation}
        if step < args.warmup_steps:
            loss.backward()  # FSDP2 averages the gradients over the ranks in its reduce-scatter
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        done = step + 1
        stats.update(step=done, loss=float(loss.detach()), grad_norm=float(grad_norm))
        if dist_info.is_main:
            with open(log, "a") as f:
                f.write(json.dumps(stats) + "\n")
            for key, value in stats.items():
                if key != "step":
                    writer.add_scalar(f"refreward/{key}", value, done)
            writer.flush()
        stopping = stop.requested()
        if done % args.save_every == 0 or done == total or stopping:
            T.save_training_checkpoint(ckpt_root, done, model, optimizer, dist_info, keep_last=args.keep_last,
                                       sharded=sharded)
        if stopping:
            return T.stopped(stop, writer, dist_info)
    stop.restore()
    weights = T.gather_full_state(model, None)[0]  # collective under FSDP2: rank 0 gets the full weights
    if dist_info.is_main:
        model.config.use_cache = True
        model.save_pretrained(out, state_dict=weights)
        processor.save_pretrained(out)
        writer.close()
        print(f"[train] saved the RefReward model to {out}")
    T.cleanup_distributed()
    return out


def evaluate_pairs(scorer: RR.RefRewardScorer, pairs: list[RR.Pair], root: Path) -> dict:
    """Accuracy over pairs with a consistent verdict, and the counts of the others (invalid, inconsistent)."""
    correct = counted = 0
    by_lr: dict[str, list[RR.Pair]] = {}
    for pair in pairs:  # the pairs of one LR are asked together: one batch of generations per LR
        by_lr.setdefault(pair.lr, []).append(pair)
    for group in by_lr.values():
        images = [load_images(pair, root) for pair in group]
        verdicts = scorer.compare(images[0][0], [a for _, a, _ in images], [b for _, _, b in images])
        for pair, verdict in zip(group, verdicts):
            if verdict is not None:
                counted += 1
                correct += (verdict == "x") == (pair.preferred == "a")
    return {"pairs": len(pairs), "consistent": counted, "accuracy_of_consistent": correct / counted if counted else math.nan,
            "accuracy_all": correct / len(pairs), "invalid_answers": scorer.stats["invalid"],
            "position_inconsistent": scorer.stats["position_inconsistent"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p_pairs = sub.add_parser("pairs", help="COMPASS annotation JSONL -> pairs JSONL", formatter_class=fmt)
    p_pairs.add_argument("--compass", required=True, help="JSONL written by train_compass.py annotate")
    p_pairs.add_argument("--root", default="", help="folder its paths are relative to (default: its folder)")
    p_pairs.add_argument("--out", required=True, help="pairs JSONL to write (same root as the COMPASS file)")
    p_pairs.add_argument("--margin", type=float, default=0.1, help="minimum difference of the label rewards (Eq.4)")
    p_pairs.add_argument("--seed", type=int, default=0, help="seed of the A/B order")
    T.add_dataclass_args(sub.add_parser("train", help="GRPO training", formatter_class=fmt), TrainArgs)
    p_eval = sub.add_parser("eval", help="pairwise accuracy on held-out pairs (both orders asked)", formatter_class=fmt)
    p_eval.add_argument("--model", required=True, help="'tiny', 'mini', a folder or hub name")
    p_eval.add_argument("--data", required=True, help="held-out pairs JSONL")
    p_eval.add_argument("--root", default="", help="folder its paths are relative to (default: its folder)")
    p_eval.add_argument("--out", default="", help="write the numbers to this JSON file")
    ns = vars(parser.parse_args(argv))
    command = ns.pop("command")
    t0 = time.time()
    if command == "pairs":
        root = Path(ns["root"]) if ns["root"] else Path(ns["compass"]).parent
        pairs = RR.pairs_from_compass(load_records(ns["compass"], root), ns["margin"], seed=ns["seed"])
        RR.write_pairs(pairs, ns["out"])
        print(f"[pairs] {len(pairs)} pairs from {ns['compass']} -> {ns['out']}")
    elif command == "train":
        if not ns["data"]:
            parser.error("train: --data is required")
        if ns["warmup_verdicts"] not in ("random", "labelled", "readings"):
            parser.error(f"train: --warmup-verdicts {ns['warmup_verdicts']}: choose random, labelled or readings")
        result = train(TrainArgs(**ns))
        if isinstance(result, int):
            return result
    else:
        root = Path(ns["root"]) if ns["root"] else Path(ns["data"]).parent
        model, processor = RR.load_refreward(ns["model"])
        result = evaluate_pairs(RR.RefRewardScorer(model, processor), RR.load_pairs(ns["data"], root), root)
        print(json.dumps(result, indent=1))
        if ns["out"]:
            T.atomic_write_text(json.dumps(result, indent=1), ns["out"])
    print(f"[{command}] done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    T.run_script(main)
