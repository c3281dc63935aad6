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
from pathlib import Path

import torch

import backbone as B
import serving

ROOT = Path(__file__).resolve().parent


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


def run_and_measure(cmd: list[str]) -> tuple[int, float]:
    """Run a command, return (exit code, peak RSS in MB of that process alone, via wait4)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()[-2000:]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{err}")
    return proc.returncode, usage.ru_maxrss / 1024


def bench_rl_vs_sft(tmp: Path, k: int, steps: int) -> dict:
    """Peak RSS of short SFT and RL runs at the same batch (K samples), and the RL step's time split."""
    from skimage import data as skdata

    from data import save_image

    hr = tmp / "hr"
    hr.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):  # K images: an SFT batch of K, one RL group of K
        img = torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1).float() / 255
        save_image(torch.nn.functional.interpolate(img[None], size=(128, 128), mode="area")[0], hr / f"{name}.png")
    py = sys.executable
    _, sft_mb = run_and_measure([py, "train_sft.py", "--model", "tiny", "--hr-dir", str(hr), "--crop-size", "64",
                                 "--batch-size", str(k), "--steps", str(steps), "--sample-every", "0",
                                 "--out", str(tmp / "sft")])
    _, rl_mb = run_and_measure([py, "rl_fr.py", "--model", "tiny", "--hr-dir", str(hr), "--crop-size", "64",
                                "--group-size", str(k), "--rollout-batch", str(k), "--train-batch", str(k),
                                "--steps", str(steps), "--fidelity", "ssim", "--sample-every", "0",
                                "--out", str(tmp / "fr.safetensors")])
    log = [json.loads(x) for x in (tmp / "fr" / "rewards.jsonl").read_text().splitlines()][1:]  # skip warm-up
    other = sorted(e["other_time_share"] for e in log)[len(log) // 2]
    policy = sorted(e["policy_time_share"] for e in log)[len(log) // 2]
    return {"sft_peak_rss_mb": sft_mb, "rl_peak_rss_mb": rl_mb, "rss_ratio": rl_mb / sft_mb,
            "rl_outside_model_share": other, "rl_policy_share": policy,
            "rl_reward_share": 1 - other - policy}


def bench_remote_scoring(tmp: Path, k: int, concurrency: int) -> dict:
    """K pairs scored by a local `transformers serve` with `concurrency` requests in flight vs one."""
    import reward

    model, processor = reward.build_tiny_compass()
    folder = tmp / "compass"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    lr = B.to_pil(torch.rand(3, 16, 16))
    sr = [B.to_pil(torch.rand(3, 64, 64)) for _ in range(k)]
    with serving.serve_locally(folder) as url:
        reward.time_remote_scoring(url, str(folder), lr, sr[:2], concurrency=(2,))  # warm-up
        seconds = reward.time_remote_scoring(url, str(folder), lr, sr, concurrency=(1, concurrency))
    t_one, t_many = seconds[1], seconds[concurrency]
    return {"K": k, "concurrency": concurrency, "one_at_a_time_s": t_one, "concurrent_s": t_many,
            "speedup": t_one / t_many}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shortened settings (CI)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    repeats = 2 if a.quick else 5
    torch.manual_seed(0)
    bb = B.load_backbone("tiny")
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
               f"torch {torch.__version__}", "quick": a.quick}
    with torch.no_grad():
        results["infer_vs_stock"] = bench_infer_vs_stock(bb, 64 if a.quick else 128, 4 if a.quick else 10, repeats)
        results["batched_rollouts"] = bench_batched_rollouts(bb, 8, 64, 4 if a.quick else 6, repeats)
    with tempfile.TemporaryDirectory() as tmp:
        results["rl_vs_sft"] = bench_rl_vs_sft(Path(tmp), 4, 3 if a.quick else 6)
    with tempfile.TemporaryDirectory() as tmp:
        results["remote_scoring"] = bench_remote_scoring(Path(tmp), 8 if a.quick else 24, 8)
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
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
