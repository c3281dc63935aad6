"""The README's demo and the benchmark, on their shortened settings (what a newcomer runs first)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.commands import run_command



def _run_script(tmp_path: Path, *args: str) -> str:
    """`python ARGS...` in the repository, run in this process as the mini builds run their stages
    (common/commands.py: the libraries are already imported); returns its output, fails with its end."""
    log = tmp_path / "output.log"
    run_command(list(args), log)
    return log.read_text()


@pytest.mark.slow
def test_demo_quick_writes_a_complete_report(tmp_path):
    out = tmp_path / "demo"
    # --served-reward: the NR stage through a local `transformers serve` (the default scores in-process, as
    # every RL test does; this is the one test of the demo's server branch)
    stdout = _run_script(tmp_path, "-m", "mini.demo", "--quick", "--out", str(out), "--reward-views", "2", "--eval-views",
                         "3", "--served-reward")
    report = (out / "report.md").read_text()
    assert json.loads((out / "nr" / "args.json").read_text())["reward_url"].startswith("http://127.0.0.1:")
    assert "| NR (COMPASS served) |" in report
    # the RL stages (FR in-process, NR served) read 2 views, the evaluations 3
    assert "2 in the RL stages (--reward-views), 3 in the evaluations" in report
    assert re.search(r"evaluation\.sriqa .*--reward-views 3", stdout)
    for stage in ("fr", "nr"):
        assert json.loads((out / stage / "args.json").read_text())["reward_views"] == 2, stage
    for section in ("## 1. Cold start", "## 2. COMPASS reward model", "## 3-4. Online RL",
                    "## 5-6. The policies before and after RL", "![curves](curves.png)", "![comparison](comparison.png)"):
        assert section in report, section
    for picture in ("curves.png", "comparison.png"):
        assert (out / picture).stat().st_size > 1000
    # 1. the cold start ran its steps and moved the weights away from the mini base (that its loss falls
    # is tested over 40 steps in test_train_sft.py; 6 quick steps at random t are too few to compare)
    losses = json.loads((out / "sft" / "train_log.json").read_text())["losses"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    from safetensors.torch import load_file

    from common import backbone as B

    base = B.load_backbone("mini").transformer.state_dict()
    tuned = load_file(str(out / "sft" / "transformer.safetensors"))
    assert tuned.keys() == base.keys() and any(not torch.equal(tuned[k], base[k]) for k in base)
    # 2. the shipped mini COMPASS ranks the held-out pairs, every answer parsed
    assert re.search(r"\| GT-Free \| COMPASS \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", report)
    # 3-4. both RL stages logged a finite reward per step and wrote their LoRA files
    for stage in ("fr", "nr"):
        log = [json.loads(x) for x in (out / stage / "rewards.jsonl").read_text().splitlines()]
        assert log and all(math.isfinite(e["reward_mean"]) for e in log), stage
        assert (out / f"{stage}.safetensors").exists()
    # 5-6. every policy evaluated on the same held-out crops, with every column
    before_after = json.loads((out / "before_after.json").read_text())
    assert list(before_after) == ["SFT", "SFT + FR LoRA", "SFT + NR LoRA"]
    for metrics in before_after.values():
        assert all(math.isfinite(v) for v in metrics["R"] + metrics["SSIM"] + metrics["SNB"])
        # R_FR, the FR stage's reward: Eq.4 with F = the crop's SSIM to the HR and COMPASS's Q_LR, Q_SR
        for r_fr, f, q_lr, q_sr in zip(metrics["R_FR"], metrics["SSIM"], metrics["Q_LR"], metrics["Q_SR"]):
            assert r_fr == pytest.approx(f * q_lr + f ** (q_lr / 7) * (q_sr - q_lr), abs=1e-5)
        # the delivered outputs (back-projection towards the LR) explain their LR better than the raw samples
        assert all(out_ > raw + 3 for out_, raw in zip(metrics["LRcons_out"], metrics["LRcons"]))
    assert (out / "sr_nr" / "metrics.csv").exists()


@pytest.mark.slow
def test_miniature_quick_runs_every_table(tmp_path):
    out = tmp_path / "mini"
    _run_script(tmp_path, "-m", "mini.miniature", "--quick", "--out", str(out))
    report = (out / "report.md").read_text()
    for title in ("Table 5", "Table 8", "Table 7", "Does the paper's sign reproduce?"):
        assert title in report, title
    results = json.loads((out / "results.json").read_text())["per_seed"]
    assert {"SFT", "FR (base)", "FR + NR (SFT)", "NR gain", "NR Flow-GRPO", "NR Flow-GRPO, NFT's time"} <= set(results)
    # the equal-time Flow-GRPO run trained for the steps that fit in NFT's NR-stage seconds
    runs = out / "runs"
    nft, grpo = (json.loads((runs / f"{key}_s0.time").read_text()) for key in ("nr_base", "nr_grpo"))
    assert json.loads((runs / "nr_grpo_time_s0" / "args.json").read_text())["steps"] == max(1, round(2 * nft / grpo))
    # the same held-out set and noise: rows that share a run have identical numbers
    assert results["NR compass"] == results["FR + NR (base)"] == results["NR NFT"]
    assert len(re.findall(r"\| (yes|no) \|", report)) == 10
    stamp = json.loads((out / "runs" / "made_with.json").read_text())
    assert stamp["settings"]["fr_steps"] == 3 and "compass/model.safetensors" in stamp["weights"]


def test_the_held_out_set_is_plain_lr_and_the_nr_inputs_keep_their_content(tmp_path):
    """The demo's and miniature's held-out LRs are the plain LR of the SR bars (blur 0.8 + bicubic), crop i the
    same in any set size; the NR stage's "real LQ" keeps the coarse picture (the paper's ranges would not)."""
    from common import data
    from mini import miniature

    held = miniature.HeldOut.make(3)
    assert torch.equal(held.lr, data.plain_degrade(held.hr, 0.8))
    assert torch.equal(miniature.HeldOut.make(2).hr, held.hr[:2])
    paper = miniature.HeldOut.make(3, lr_kind="realesrgan")
    assert torch.equal(paper.hr, held.hr) and not torch.equal(paper.lr, held.lr)
    hr_dir, lq_dir = miniature.make_training_data(tmp_path, 4)
    lq_hr = miniature.photos.random_crops(miniature.photos.TRAIN, 4, 64, torch.Generator().manual_seed(302))
    lq = torch.stack([data.load_image(lq_dir / f"{i:04d}.png") for i in range(4)])
    # the LQ explains its HR's 4x4 block means far better than the paper's degradation of the same crops does
    blocks = lambda x: torch.nn.functional.avg_pool2d(x, 4)  # noqa: E731
    paper_lq = torch.cat([data.degrade(lq_hr[i:i + 1], generator=torch.Generator().manual_seed(data.item_seed(302, 0, i)))
                          for i in range(4)])
    assert (lq - blocks(lq_hr)).abs().mean() < 0.5 * (paper_lq - blocks(lq_hr)).abs().mean()


def test_miniature_reuses_runs_only_when_settings_and_weights_match(tmp_path):
    from mini import miniature

    runs = tmp_path / "runs"
    miniature.claim_runs_dir(runs, miniature.Settings())  # a new folder: stamped
    (runs / "fr_base_s0.safetensors").write_bytes(b"finished run")
    miniature.claim_runs_dir(runs, miniature.Settings())  # same settings and weights: reused
    with pytest.raises(SystemExit, match=str(runs)):
        miniature.claim_runs_dir(runs, miniature.Settings(lr=1e-3))
    (runs / "made_with.json").unlink()  # finished runs of unknown origin are never reused (or deleted)
    with pytest.raises(SystemExit, match="other settings or other mini weights"):
        miniature.claim_runs_dir(runs, miniature.Settings())
    assert (runs / "fr_base_s0.safetensors").exists()


@pytest.mark.slow
def test_bench_quick_prints_every_ratio(tmp_path):
    stdout = _run_script(tmp_path, "-m", "scale.bench", "--quick", "--json", str(tmp_path / "bench.json"))
    for line in ("1. infer / stock pipeline time ratio", "2. batched vs one-by-one rollouts",
                 "3. RL step / SFT step peak RSS", "4. RL step share outside model compute",
                 "5. remote scoring", "6. Flow-GRPO / NFT", "7. FSDP2 loading"):
        assert line in stdout, line
    r = json.loads((tmp_path / "bench.json").read_text())
    values = [r["infer_vs_stock"]["time_ratio"], r["infer_vs_stock"]["max_abs_diff"],
              r["batched_rollouts"]["speedup_per_sample"], r["rl_vs_sft"]["rss_ratio"],
              r["rl_vs_sft"]["rl_outside_model_share"], r["remote_scoring"]["speedup"],
              r["objectives"]["step_time_ratio"], r["objectives"]["rss_ratio"], r["fsdp_loading"]["rank1_ratio"]]
    assert all(math.isfinite(v) and v >= 0 for v in values)
    assert r["infer_vs_stock"]["max_abs_diff"] < 1e-4  # same condition and noise: same image
    assert r["fsdp_loading"]["rank1_ratio"] < 1  # rank 1 never holds the full model
    assert r["objectives"]["trajectory_mb"] > 0 and r["objectives"]["flow_grpo"]["steps"] == 3


def test_bench_measures_the_peak_memory_of_the_child_alone(tmp_path):
    """Items 3 and 6 compare the peak RSS of two script runs. A child's ru_maxrss carries its parent's
    high-water mark across fork and exec, so a 1.2 GB bench read 1216.5 MB for both its SFT and RL runs;
    the child's own VmHWM does not."""
    from scale import bench

    parent = torch.ones(300 * 2**20 // 4)  # this process holds 300 MB more than any child below
    (tmp_path / "small.py").write_text("print('nothing')\n")
    (tmp_path / "big.py").write_text("import numpy as np\nx = np.ones(200 * 2**20 // 8)\nx += 1\n")
    _, small = bench.run_and_measure([sys.executable, str(tmp_path / "small.py")])
    _, big = bench.run_and_measure([sys.executable, str(tmp_path / "big.py")])
    assert small < 100 < 200 < big < 300 + small, (small, big)
    (tmp_path / "bad.py").write_text("raise SystemExit('no input')\n")
    with pytest.raises(RuntimeError, match="no input"):
        bench.run_and_measure([sys.executable, str(tmp_path / "bad.py")])
    del parent


def test_bench_fsdp_item_names_a_failed_worker_by_the_ranks_own_message(tmp_path, monkeypatch):
    """Item 7: the ratio is rank 1's meta / full RSS; a failed torchrun raises with the ranks' own message
    (the head of stderr), not only torchrun's summary (its tail)."""
    from scale import bench

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        mode, out = cmd[cmd.index("--fsdp-worker") + 1], Path(cmd[cmd.index("--json") + 1])
        if fail:
            return subprocess.CompletedProcess(cmd, 1, "", "rank 0 message\n" + "x" * 5000 + "summary")
        out.write_text(json.dumps({"rss_mb": [100.0, 50.0 if mode == "meta" else 80.0], "params": 7}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    fail = False
    result = bench.bench_fsdp_loading(tmp_path, 256)
    assert len(calls) == 2 and result["rank1_ratio"] == pytest.approx(50.0 / 80.0)
    calls.clear()
    fail = True
    with pytest.raises(RuntimeError, match="(?s)rank 0 message.*summary"):
        bench.bench_fsdp_loading(tmp_path, 256)
    assert len(calls) == 1
