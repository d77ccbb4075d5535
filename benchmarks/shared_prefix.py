"""Shared prefix against the repeated layout, per training step, side by side in one run (issue 15).

One CalibRL trainer (token gap, learning rate 0, so every step starts from the same weights) runs each step
twice, once per layout (`CalibRLConfig.shared_prefix` off = TRL's repeated layout, on = calibrl.prefix), in
alternating order, from the same seed and the same batch; the first round is a warm-up. Each step is timed in
its three phases as TRL runs them: generation and scoring (`_prepare_inputs`), the loss forward
(`compute_loss`: policy forward, and CalibRL's expert forward), and the backward. Peak memory is the peak
resident set of a fresh process that runs a few steps in one layout, less what it held before the first
step (on CPU there is no allocator counter to read per phase).

    python -m benchmarks.shared_prefix                          # both settings, ~10 min on 2 cores
    python -m benchmarks.shared_prefix --settings demo --steps 5
    python -m benchmarks.shared_prefix --quick                  # nano model, a few tokens: the code path only

Settings:
  demo   the demo's step: tiny Qwen2.5-VL `small`, 16 prompts x 8 rollouts, 80 new tokens, digit images as
         generated (28 px tall, 2 image tokens).
  long   a long multimodal prefix: the same with every image upscaled x4 (112 px tall, 32 image tokens per
         two-digit image) and 8 prompts x 8 rollouts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = {
    "demo": {"size": "small", "prompts": 16, "generations": 8, "max_new_tokens": 80, "image_scale": 1},
    "long": {"size": "small", "prompts": 8, "generations": 8, "max_new_tokens": 80, "image_scale": 4},
    "quick": {"size": "nano", "prompts": 2, "generations": 2, "max_new_tokens": 8, "image_scale": 1},
}
PHASES = ("generation", "forward", "backward")
LAYOUTS = ("repeated", "shared")


def build(setting: dict, workdir: str, steps: int):
    """A saved tiny model, a digits dataset (images scaled), and a CalibRL trainer on it with lr 0."""
    from PIL import Image

    from calibrl import CalibRLConfig, CalibRLTrainer
    from calibrl.models import build_tiny_model, load_tiny_model, save_tiny_model
    from calibrl.rewards import accuracy_reward, format_reward
    from calibrl.tasks import make_dataset, to_hf_dataset

    model, proc = build_tiny_model("qwen2_5_vl", setting["size"], seed=0)
    save_tiny_model(model, proc, f"{workdir}/model")
    rows = make_dataset("digits", "train", n=setting["prompts"] * (steps + 2), seed=0, expert_style="mismatched")
    k = setting["image_scale"]
    if k != 1:
        for row in rows:
            key = "images" if "images" in row else "image"
            scale = lambda im: im.resize((im.width * k, im.height * k), Image.Resampling.BILINEAR)  # noqa: E731
            row[key] = [scale(im) for im in row[key]] if isinstance(row[key], list) else scale(row[key])
    model, proc = load_tiny_model(f"{workdir}/model")
    cfg = CalibRLConfig(
        output_dir=f"{workdir}/run", method="calibrl", gap="token", use_cpu=True, bf16=False, report_to="none",
        save_strategy="no", disable_tqdm=True, seed=0, learning_rate=0.0, max_steps=steps + 1,
        per_device_train_batch_size=setting["prompts"] * setting["generations"],
        num_generations=setting["generations"], max_completion_length=setting["max_new_tokens"],
        reward_weights=[1.0, 0.1], shared_prefix=True, activation_checkpointing=False,  # as configs/demo.yaml
    )
    trainer = CalibRLTrainer(model=model, reward_funcs=[accuracy_reward, format_reward], args=cfg,
                             train_dataset=to_hf_dataset(rows), processing_class=proc)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # normally set by the training loop
    return trainer


def phased_step(trainer, batch: list[dict], layout: str, seed: int) -> dict[str, float]:
    """One training step in `layout`, its three phases timed (seconds)."""
    trainer.args.shared_prefix = layout == "shared"
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    inputs = trainer._prepare_inputs(batch)
    t1 = time.perf_counter()
    loss = trainer.compute_loss(trainer.model, inputs)
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    trainer.model.zero_grad(set_to_none=True)
    return {"generation": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "step": t3 - t0}


def _rss_kib() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def peak_memory(name: str, layout: str, steps: int, threads: int) -> dict:
    """Peak resident memory of a fresh process running `steps` steps in `layout` (this file, --memory-of)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.shared_prefix", "--memory-of", layout, "--settings", name,
                          "--steps", str(steps), "--threads", str(threads)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_of(name: str, layout: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="calibrl-prefix-mem-") as tmp:
        trainer = build(SETTINGS[name], tmp, steps)
        batches = iter(trainer.get_train_dataloader())
        before = _rss_kib()
        for step in range(steps):
            phased_step(trainer, next(batches), layout, seed=step)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"layout": layout, "rss_before_mib": before / 1024, "peak_rss_mib": peak / 1024,
            "peak_over_start_mib": (peak - before) / 1024}


def compare(name: str, steps: int, threads: int, memory: bool) -> dict:
    """Median phase times per layout over `steps` interleaved steps, their ratios, and peak memory."""
    setting = SETTINGS[name]
    with tempfile.TemporaryDirectory(prefix="calibrl-prefix-") as tmp:
        trainer = build(setting, tmp, steps)
        batches = iter(trainer.get_train_dataloader())
        times: dict[str, list[dict]] = {layout: [] for layout in LAYOUTS}
        for step in range(steps + 1):
            batch = next(batches)
            for layout in (LAYOUTS if step % 2 == 0 else LAYOUTS[::-1]):
                t = phased_step(trainer, batch, layout, seed=step)
                if step > 0:  # step 0 is a warm-up
                    times[layout].append(t)
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        shape = {"prompt_tokens_mean": inputs["prompt_mask"].sum(1).float().mean().item(),
                 "completion_tokens_mean": inputs["completion_mask"].sum(1).float().mean().item()}
    med = {layout: {p: statistics.median(t[p] for t in times[layout]) for p in (*PHASES, "step")}
           for layout in LAYOUTS}
    from benchmarks.reproduce import machine_info

    result = {
        "setting": {**setting, "name": name, "threads": torch.get_num_threads(), "timed_steps": steps, **shape},
        "machine": machine_info(),  # load average included: other work on the machine slows both layouts alike
        "median_s": med,
        "ratio_shared_over_repeated": {p: med["shared"][p] / med["repeated"][p] for p in (*PHASES, "step")},
        "speedup_per_step": med["repeated"]["step"] / med["shared"]["step"],
    }
    if memory:
        result["memory"] = {layout: peak_memory(name, layout, min(steps, 3), threads) for layout in LAYOUTS}
    return result


def format_result(r: dict) -> str:
    s, med, ratio = r["setting"], r["median_s"], r["ratio_shared_over_repeated"]
    lines = [f"[{s['name']}] {s['prompts']} prompts x {s['generations']}, {s['max_new_tokens']} new tokens, images x"
             f"{s['image_scale']}: prompt {s['prompt_tokens_mean']:.0f} tokens, completions "
             f"{s['completion_tokens_mean']:.0f}; {s['timed_steps']} interleaved steps, {s['threads']} thread(s)"]
    for p in (*PHASES, "step"):
        lines.append(f"  {p:<10} repeated {med['repeated'][p]:7.3f} s   shared {med['shared'][p]:7.3f} s   "
                     f"ratio {ratio[p]:.3f}")
    lines.append(f"  speed-up per step: {r['speedup_per_step']:.2f}x")
    if "memory" in r:
        m = r["memory"]
        lines.append(f"  peak memory over start: repeated {m['repeated']['peak_over_start_mib']:.0f} MiB   shared "
                     f"{m['shared']['peak_over_start_mib']:.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["demo", "long"], choices=sorted(SETTINGS))
    p.add_argument("--steps", type=int, default=6, help="timed steps per layout (after one warm-up round)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--quick", action="store_true", help="the nano setting, 2 steps: the code path only")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--memory-of", choices=LAYOUTS, help=argparse.SUPPRESS)  # the child process of peak_memory
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_of:
        result = memory_of(args.settings[0], args.memory_of, args.steps)
        print(json.dumps(result))
        return result
    names, steps = (["quick"], 2) if args.quick else (args.settings, args.steps)
    results = {}
    for name in names:
        results[name] = compare(name, steps, args.threads, memory=not args.no_memory)
        print(format_result(results[name]), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
