"""Benchmark: every speed/memory ratio the project promises, measured in ONE run on the tiny preset.

    python bench.py            # full (a few minutes on 2 CPU cores)
    python bench.py --quick    # shortened (CI)

Ratios (goals in brackets):
  1. infer.py sampler vs the stock QwenImageEditPlusPipeline, same weights/steps/condition:
     time ratio [<= 1.05] and max |difference| of the output image
  2. K rollouts in one batch vs K one by one, conditioning computed once: per-sample speed-up [>= 0.5 K]
  3. peak RSS of an RL step vs an SFT step at the same batch (one model copy) [<= 1.3]
  4. share of the RL step outside model compute (policy forward/backward and reward scoring) [<= 10%]
  5. remote reward scoring of K=24 pairs, concurrent requests vs one at a time, against a local
     `transformers serve` process on 127.0.0.1 [> 1]
  6. Flow-GRPO vs NFT (same preset and K): wall time per RL step, peak RSS, the trajectory Flow-GRPO stores;
     on the mini preset (full run) also the held-out reward each reaches in the same wall time [paper: NFT
     trains and converges 5-10x faster]
  7. FSDP2 loading under torchrun with 2 processes: peak RSS of rank 1 when it builds the model on the meta
     device and receives its shards from rank 0, against loading the full model itself [< 1]
Timings take the best of several repeats (the machine is shared); no result is asserted here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import reward
from common import backbone as B
from common import presets
from common import training as T
from common import vl_model as VL
from common.data import save_image
from mini import photos, serving
from mini.miniature import HeldOut, evaluate_policy, policy

ROOT = Path(__file__).resolve().parents[1]  # the repository: scripts run from there


def best_time(fn, repeats: int) -> float:
    """Minimum wall time of `repeats` calls (the least disturbed run on a shared machine)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_infer_vs_stock(bb: B.Backbone, size: int, steps: int, repeats: int) -> dict:
    """Our condition+sampler+decode vs the stock pipeline given the same image, prompt embedding, noise."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as stock

    image = torch.rand(3, size, size)
    cond = B.encode_condition_image(bb, image)
    noise = B.initial_noise(cond, 1, torch.Generator().manual_seed(0))
    stock.VAE_IMAGE_SIZE = size * size  # the pipeline's VAE input at our output size (it defaults to ~1 MP)
    pipe = bb.pipeline()
    pil = B.to_pil(image)

    def ours():
        c = B.encode_condition_image(bb, image)
        sig = B.sigma_schedule(bb.scheduler, steps, c.num_tokens)
        return B.decode(bb, B.sample(bb.transformer, c, noise, sig), c)

    def theirs():
        return pipe(image=pil, prompt=B.DEFAULT_PROMPT, latents=noise, height=size, width=size,
                    num_inference_steps=steps, true_cfg_scale=1.0, output_type="pt").images  # no CFG (as ours)

    ours(), theirs()  # warm-up
    t_ours, t_theirs = best_time(ours, repeats), best_time(theirs, repeats)
    # difference with the SAME prompt embedding (ours passes mm_token_type_ids, diffusers 0.42.1 does not)
    sig = B.sigma_schedule(bb.scheduler, steps, cond.num_tokens)
    a = B.decode(bb, B.sample(bb.transformer, cond, noise, sig), cond)
    b = pipe(image=pil, prompt_embeds=cond.prompt_embeds, prompt_embeds_mask=cond.prompt_mask, latents=noise,
             height=size, width=size, num_inference_steps=steps, true_cfg_scale=1.0, output_type="pt").images
    return {"infer_time_s": t_ours, "stock_time_s": t_theirs, "time_ratio": t_ours / t_theirs,
            "max_abs_diff": float((a - b).abs().max())}


def bench_batched_rollouts(bb: B.Backbone, k: int, size: int, steps: int, repeats: int) -> dict:
    lr = torch.rand(3, size // 4, size // 4)
    cond = B.encode_condition(bb, lr)  # once, shared by both ways
    noise = B.initial_noise(cond, k, torch.Generator().manual_seed(0))
    sig = B.sigma_schedule(bb.scheduler, steps, cond.num_tokens)
    batched = best_time(lambda: B.sample(bb.transformer, cond, noise, sig), repeats)
    single = best_time(lambda: [B.sample(bb.transformer, cond, noise[i:i + 1], sig) for i in range(k)], repeats)
    return {"K": k, "batched_s": batched, "one_by_one_s": single, "speedup_per_sample": single / batched,
            "goal_speedup": 0.5 * k}


# Runs a script as `python SCRIPT ARGS` would and writes its peak RSS (VmHWM, kB) to a file at the end. The
# child's own ru_maxrss (os.wait4) cannot be used: Linux carries the forking parent's high-water mark into the
# child across exec, so every child of this process (1.2 GB after items 1-2) read the same peak.
_PEAK_RSS_WRAPPER = """
import runpy, sys
out = sys.argv.pop(1)
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open("/proc/self/status") as f:
        peak = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(out, "w") as f:
        f.write(peak)
"""


def run_and_measure(cmd: list[str]) -> tuple[int, float]:
    """Run `python SCRIPT ARGS...` (cmd = [python, SCRIPT, ARGS...]); return (exit code, peak RSS in MB of that
    process alone: its VmHWM, Linux)."""
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak_kb"
        proc = subprocess.run([cmd[0], "-c", _PEAK_RSS_WRAPPER, str(peak_file), *cmd[1:]], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-2000:]}")
        return proc.returncode, int(peak_file.read_text()) / 1024


def training_crops(tmp: Path) -> Path:
    """8 crops of 64x64 from the mini training photos: the HR folder of every RL and SFT run below."""
    hr = tmp / "hr"
    hr.mkdir(exist_ok=True)
    for i, crop in enumerate(photos.random_crops(photos.TRAIN, 8, 64, torch.Generator().manual_seed(0))):
        save_image(crop, hr / f"{i}.png")
    return hr


def rl_args(model: str, hr: Path, k: int) -> list[str]:
    """rl_fr.py's flags shared by every RL run of the bench: one group of K per step, 6 rollout steps."""
    return ["--model", model, "--hr-dir", str(hr), "--crop-size", "64", "--group-size", str(k), "--rollout-batch",
            str(k), "--train-batch", str(k), "--rollout-steps", "6", "--fidelity", "ssim", "--sample-every", "0",
            "--save-every", "1000", "--lr", "1e-3", "--reward-model", "mini" if model == "mini" else "tiny"]


def bench_rl_vs_sft(tmp: Path, hr: Path, k: int, steps: int, rl: dict) -> dict:
    """Peak RSS of a short SFT run at batch K against the NFT run `rl` (tiny, one group of K: `rl_run`), and the
    RL step's time split from its log."""
    _, sft_mb = run_and_measure([sys.executable, "train_sft.py", "--model", "tiny", "--hr-dir", str(hr),
                                 "--crop-size", "64", "--batch-size", str(k), "--steps", str(steps),
                                 "--sample-every", "0", "--out", str(tmp / "sft")])
    log = rl["log"][1:]  # skip warm-up
    other = sorted(e["other_time_share"] for e in log)[len(log) // 2]
    policy = sorted(e["policy_time_share"] for e in log)[len(log) // 2]
    return {"sft_peak_rss_mb": sft_mb, "rl_peak_rss_mb": rl["peak_rss_mb"], "rss_ratio": rl["peak_rss_mb"] / sft_mb,
            "rl_outside_model_share": other, "rl_policy_share": policy,
            "rl_reward_share": 1 - other - policy}


def time_remote_scoring(
    base_url: str,
    model_name: str,
    lr_image: Image.Image,
    sr_images: list[Image.Image],
    concurrency: Sequence[int] = (1, 8),
    synthetic: bool = True,
    **scorer_kwargs,
) -> dict[int, float]:
    """Wall-clock seconds to score one group (e.g. K=24 outputs of one LR) at each concurrency level.

    For bench.py: `time_remote_scoring(url, name, lr, srs, concurrency=(1, 8))` -> {1: s, 8: s}.
    """
    seconds = {}
    for c in concurrency:
        scorer = reward.RemoteScorer(base_url, model_name, concurrency=c, synthetic=synthetic, **scorer_kwargs)
        start = time.perf_counter()
        scorer.score_group(lr_image, sr_images)
        seconds[c] = time.perf_counter() - start
    return seconds


def bench_remote_scoring(tmp: Path, k: int, concurrency: int) -> dict:
    """K pairs scored by a local `transformers serve` with `concurrency` requests in flight vs one."""
    model, processor = VL.build_tiny_compass()
    folder = tmp / "compass"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    lr = B.to_pil(torch.rand(3, 16, 16))
    sr = [B.to_pil(torch.rand(3, 64, 64)) for _ in range(k)]
    with serving.serve_locally(folder) as url:
        time_remote_scoring(url, str(folder), lr, sr[:2], concurrency=(2,))  # warm-up
        seconds = time_remote_scoring(url, str(folder), lr, sr, concurrency=(1, concurrency))
    t_one, t_many = seconds[1], seconds[concurrency]
    return {"K": k, "concurrency": concurrency, "one_at_a_time_s": t_one, "concurrent_s": t_many,
            "speedup": t_one / t_many}


def rl_run(tmp: Path, name: str, args: list[str]) -> dict:
    """One rl_fr.py run: peak RSS (MB), median step time (s, first step excluded), its LoRA file."""
    out = tmp / f"{name}.safetensors"
    _, rss = run_and_measure([sys.executable, "rl_fr.py", *args, "--out", str(out)])
    log = [json.loads(x) for x in (tmp / name / "rewards.jsonl").read_text().splitlines()]
    times = sorted(e["step_time"] for e in log[1:] or log)
    return {"peak_rss_mb": rss, "step_s": times[len(times) // 2], "lora": str(out), "steps": len(log), "log": log}


def bench_objectives(tmp: Path, hr: Path, model: str, k: int, steps: int, equal_time_steps: int = 0,
                     nft: dict | None = None) -> dict:
    """Flow-GRPO vs NFT in rl_fr.py on the same preset, K and steps (`nft`: that NFT run when the caller has it
    already); with `equal_time_steps`, NFT trains that many steps, Flow-GRPO as many as fit in NFT's wall time,
    and both are evaluated on the held-out set."""
    common = rl_args(model, hr, k)
    runs = {"nft": nft or rl_run(tmp, "nft", [*common, "--objective", "nft", "--steps", str(steps)]),
            "flow_grpo": rl_run(tmp, "flow_grpo", [*common, "--objective", "flow_grpo", "--steps", str(steps)])}
    bb = B.load_backbone(model)
    tokens, channels = (64 // bb.size_multiple) ** 2, 4 * bb.vae.config.z_dim
    trained = int(6 * 0.99)  # flow_grpo.train_step_indices(6): all steps but the last
    result = {"model": model, "K": k, **{name: {key: v for key, v in run.items() if key != "log"}
                                          for name, run in runs.items()},
              "step_time_ratio": runs["flow_grpo"]["step_s"] / runs["nft"]["step_s"],
              "rss_ratio": runs["flow_grpo"]["peak_rss_mb"] / runs["nft"]["peak_rss_mb"],
              "trajectory_mb": k * (trained + 1) * tokens * channels * 4 / 2**20}
    if equal_time_steps:
        budget = equal_time_steps * runs["nft"]["step_s"]
        grpo_steps = max(1, round(budget / runs["flow_grpo"]["step_s"]))
        nft = rl_run(tmp, "nft_eq", [*common, "--objective", "nft", "--steps", str(equal_time_steps)])
        grpo = rl_run(tmp, "grpo_eq", [*common, "--objective", "flow_grpo", "--steps", str(grpo_steps)])
        # the held-out reading as the demo's (the RL runs read one view: the timing compares the objectives)
        held_out, scorer = HeldOut.make(16), reward.make_scorer("mini", views=presets.MINI_COMPASS_VIEWS)
        reached = {name: float(np.mean(evaluate_policy(policy("mini", lora), held_out, scorer)[0]["R"]))
                   for name, lora in (("SFT", None), ("nft", nft["lora"]), ("flow_grpo", grpo["lora"]))}
        result["equal_time"] = {"seconds": budget, "nft_steps": equal_time_steps, "flow_grpo_steps": grpo_steps,
                                "heldout_reward": reached}
    return result


def fsdp_load_worker(mode: str, width: int, out: str) -> None:
    """Under torchrun: build a 2-block MMDiT of width `width` on every rank ('full', every rank loads the
    weights) or on rank 0 only ('meta', the others receive their shards), shard it with FSDP2, and write
    each rank's peak RSS (MB) to `out` (JSON, rank 0)."""
    import resource

    from diffusers import QwenImageTransformer2DModel

    info = T.setup_distributed("cpu")
    config = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=128,
                  num_attention_heads=width // 128, joint_attention_dim=width, axes_dims_rope=(16, 56, 56))
    with T.parameters_on_meta(mode == "meta" and not info.is_main):
        torch.manual_seed(0)
        model = QwenImageTransformer2DModel(**config)
    blocks = list(model.transformer_blocks)
    if mode == "meta":
        T.shard_from_rank0(model, blocks, info)
    else:
        T.fully_shard_blocks(model, blocks, info.device, info.world_size)
    mine = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64)
    rss = [float(r) for r in T.all_gather(mine)]
    if info.is_main:
        Path(out).write_text(json.dumps({"rss_mb": rss, "params": sum(p.numel() for p in model.parameters())}))
    T.cleanup_distributed()


def bench_fsdp_loading(tmp: Path, width: int) -> dict:
    """Peak RSS of rank 1 (torchrun, 2 processes): full load on every rank vs rank 0 + meta + broadcast."""
    result = {}
    for mode in ("full", "meta"):
        out = tmp / f"fsdp_{mode}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(serving.free_port()), "-m", "scale.bench", "--fsdp-worker", mode, "--fsdp-width", str(width),
               "--json", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:  # the ranks' own messages come first, torchrun's summary last: keep both ends
            raise RuntimeError(f"FSDP loading worker ({mode}) failed:\n{proc.stderr[:2500]}\n...\n{proc.stderr[-1500:]}")
        result[mode] = json.loads(out.read_text())
    full, meta = result["full"]["rss_mb"][1], result["meta"]["rss_mb"][1]
    return {"width": width, "params": result["full"]["params"], "rank1_full_mb": full, "rank1_meta_mb": meta,
            "rank1_ratio": meta / full, "rank0_full_mb": result["full"]["rss_mb"][0],
            "rank0_meta_mb": result["meta"]["rss_mb"][0]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shortened settings (CI)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--fsdp-worker", default=None, help=argparse.SUPPRESS)  # internal: item 7 under torchrun
    p.add_argument("--fsdp-width", type=int, default=1024, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.fsdp_worker:
        fsdp_load_worker(a.fsdp_worker, a.fsdp_width, a.json)
        return {}
    repeats = 2 if a.quick else 5
    torch.manual_seed(0)
    bb = B.load_backbone("tiny")
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
               f"torch {torch.__version__}", "quick": a.quick}
    with torch.no_grad():
        results["infer_vs_stock"] = bench_infer_vs_stock(bb, 64 if a.quick else 128, 4 if a.quick else 10, repeats)
        results["batched_rollouts"] = bench_batched_rollouts(bb, 8, 64, 4 if a.quick else 6, repeats)
    steps, objectives_model = (3, "tiny") if a.quick else (6, "mini")
    with tempfile.TemporaryDirectory() as tmp:
        hr = training_crops(Path(tmp))
        # one tiny NFT run at K=4 is item 3's RL side and, in --quick, item 6's NFT run too (one start fewer)
        nft = rl_run(Path(tmp), "nft", [*rl_args("tiny", hr, 4), "--objective", "nft", "--steps", str(steps)])
        results["rl_vs_sft"] = bench_rl_vs_sft(Path(tmp), hr, 4, steps, nft)
        results["objectives"] = bench_objectives(Path(tmp) / "objectives", hr, objectives_model, 4 if a.quick else 8,
                                                 steps, 0 if a.quick else 24, nft if a.quick else None)
    with tempfile.TemporaryDirectory() as tmp:
        results["remote_scoring"] = bench_remote_scoring(Path(tmp), 8 if a.quick else 24, 8)
    with tempfile.TemporaryDirectory() as tmp:
        results["fsdp_loading"] = bench_fsdp_loading(Path(tmp), 1024 if a.quick else 2048)
    r = results
    print(f"OARS benchmark, {r['date']}, {r['machine']}{' (quick)' if a.quick else ''}")
    iv, br, rs, rm = r["infer_vs_stock"], r["batched_rollouts"], r["rl_vs_sft"], r["remote_scoring"]
    print(f"1. infer / stock pipeline time ratio:          {iv['time_ratio']:.3f}  (goal <= 1.05; "
          f"{iv['infer_time_s']:.3f} s vs {iv['stock_time_s']:.3f} s), max |diff| {iv['max_abs_diff']:.2e}")
    print(f"2. batched vs one-by-one rollouts, K={br['K']}:      {br['speedup_per_sample']:.2f}x per sample "
          f"(goal >= {br['goal_speedup']:.1f}x)")
    print(f"3. RL step / SFT step peak RSS:                {rs['rss_ratio']:.3f}  (goal <= 1.3; "
          f"{rs['rl_peak_rss_mb']:.0f} MB vs {rs['sft_peak_rss_mb']:.0f} MB)")
    print(f"4. RL step share outside model compute:        {rs['rl_outside_model_share']:.1%}  (goal <= 10%; "
          f"policy {rs['rl_policy_share']:.1%}, reward model {rs['rl_reward_share']:.1%})")
    print(f"5. remote scoring, K={rm['K']}, {rm['concurrency']} in flight vs 1: {rm['speedup']:.2f}x "
          f"({rm['concurrent_s']:.2f} s vs {rm['one_at_a_time_s']:.2f} s)")
    ob, fl = r["objectives"], r["fsdp_loading"]
    print(f"6. Flow-GRPO / NFT, {ob['model']} preset, K={ob['K']}: step time {ob['step_time_ratio']:.2f}x "
          f"({ob['flow_grpo']['step_s']:.2f} s vs {ob['nft']['step_s']:.2f} s), peak RSS {ob['rss_ratio']:.2f}x "
          f"({ob['flow_grpo']['peak_rss_mb']:.0f} vs {ob['nft']['peak_rss_mb']:.0f} MB), trajectory stored "
          f"{ob['trajectory_mb']:.2f} MB per group (paper's claim: NFT 5-10x faster)")
    if "equal_time" in ob:
        eq = ob["equal_time"]
        print(f"   equal wall time ({eq['seconds']:.0f} s: NFT {eq['nft_steps']} steps, Flow-GRPO "
              f"{eq['flow_grpo_steps']} steps), held-out COMPASS reward: SFT {eq['heldout_reward']['SFT']:.4f}, "
              f"NFT {eq['heldout_reward']['nft']:.4f}, Flow-GRPO {eq['heldout_reward']['flow_grpo']:.4f}")
    print(f"7. FSDP2 loading, rank 1 peak RSS, rank 0 + meta / full load: {fl['rank1_ratio']:.2f} "
          f"({fl['rank1_meta_mb']:.0f} MB vs {fl['rank1_full_mb']:.0f} MB; {fl['params'] / 1e6:.0f}M parameters)")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    T.run_script(main)
