"""GPU check: every method trains on CUDA in bf16, with its speed and peak GPU memory against the CPU.

For a machine with CUDA: a tiny Qwen2.5-VL ("small", ~1M parameters) trains for `--steps` steps of each
method (grpo, dapo, calibrl, luffy, rlplus) on the digits task, 4 prompts x 8 rollouts per step, in bf16 on
the GPU; then the same steps (fewer: `--cpu-steps`) in float32 on the CPU. Prints steps per second, peak GPU
memory (torch.cuda.max_memory_allocated) and the GPU/CPU speed ratio per method, and fails (exit 1) if a
method logs a non-finite loss or skips an optimizer step. The first step of each run (CUDA and allocator
warm-up) is left out of the speed. On the GPU the weights themselves are bf16 (`model.to("cuda", bfloat16)`,
`bf16=True`), so the memory figure is a bf16 model's; an untrained model is never right, so a soft reward for
the format tags present (weight 0.1) gives every method non-zero advantages and real gradients to time.

Without CUDA it says so and exits 0; `--cpu-only` runs the CPU part alone (so the script can be checked on
any machine). A GPU that nvidia-smi sees but torch does not is an error (exit 1): usually a CPU-only torch.

    scripts/gpu_check.sh [--steps 20] [--cpu-steps 5] [--cpu-only] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch

METHODS = ("grpo", "dapo", "calibrl", "luffy", "rlplus")
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def tag_reward(completions: list, **kwargs) -> list[float]:
    """Fraction of the four format tags present. An untrained model almost never answers correctly, so with
    accuracy and strict format alone every group has zero variance, every advantage is 0 and the check would
    time zero gradients; this soft reward varies within groups and gives every method a real gradient."""
    from calibrl.rewards import completion_text

    return [sum(t in completion_text(c) for t in TAGS) / len(TAGS) for c in completions]


def cuda_status() -> tuple[bool, str]:
    """(usable, one line saying what torch sees)."""
    if torch.cuda.is_available():
        return True, f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    built = torch.version.cuda or "none (a CPU-only build)"
    return False, f"CUDA is not available to torch {torch.__version__} (built with CUDA: {built})"


def run_method(method: str, device: str, dtype: torch.dtype, steps: int, model_dir: str, dataset, args,
               out_dir: str) -> dict:
    """Train `method` for `steps` steps on `device` from the saved tiny model; speed, memory and sanity."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from calibrl import CalibRLConfig, CalibRLTrainer
    from calibrl.models import load_tiny_model
    from calibrl.rewards import accuracy_reward, format_reward

    cuda = device == "cuda"

    class StepClock(TrainerCallback):
        """Wall-clock time at the end of every optimizer step (after the GPU has finished it)."""

        def __init__(self):
            self.stamps: list[float] = []

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())

    model, proc = load_tiny_model(model_dir)
    model.to(device=device, dtype=dtype)
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = CalibRLConfig(
        output_dir=out_dir, method=method, use_cpu=not cuda, bf16=dtype == torch.bfloat16, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, learning_rate=1e-5, max_steps=steps,
        per_device_train_batch_size=args.prompts * args.generations, num_generations=args.generations,
        max_completion_length=args.max_new_tokens, reward_weights=[1.0, 0.1, 0.1], dataloader_pin_memory=False,
    )
    clock = StepClock()
    tr = CalibRLTrainer(model=model, reward_funcs=[accuracy_reward, format_reward, tag_reward], args=cfg,
                        train_dataset=dataset, processing_class=proc, callbacks=[clock])
    tr.remove_callback(PrinterCallback)  # one summary line per method instead of every step's log dict
    t0 = time.perf_counter()
    tr.train()
    wall = time.perf_counter() - t0
    logs = [h for h in tr.state.log_history if "loss" in h]
    s = clock.stamps
    steps_per_s = (len(s) - 1) / (s[-1] - s[0]) if len(s) >= 2 and s[-1] > s[0] else len(s) / wall
    result = {
        "method": method, "device": device, "dtype": str(dtype).replace("torch.", ""), "steps": len(s),
        "wall_s": wall, "steps_per_s": steps_per_s,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "finite": all(math.isfinite(h["loss"]) and math.isfinite(h.get("grad_norm", 0.0)) for h in logs),
        "skipped_steps": tr.skipped_steps,
        "nonzero_grad_steps": sum(h.get("grad_norm", 0.0) > 0 for h in logs),
        "guide_loss_nonzero_steps": sum(abs(h.get("calibrl/guide_loss", 0.0)) > 0 for h in logs),
        "mean_reward": sum(h.get("reward", 0.0) for h in logs) / max(1, len(logs)),
        "param_device": str(next(tr.model.parameters()).device),
    }
    result["ok"] = result["finite"] and result["skipped_steps"] == 0 and len(logs) == steps
    del tr, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def table(gpu: dict[str, dict], cpu: dict[str, dict]) -> str:
    def cell(value: float | None, width: int, digits: int) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"

    head = f"{'method':8} {'GPU steps/s':>11} {'GPU peak MiB':>12} {'CPU steps/s':>11} {'GPU/CPU':>8}  ok"
    lines = [head, "-" * len(head)]
    for m in cpu or gpu:
        g, c = gpu.get(m), cpu.get(m)
        ratio = g["steps_per_s"] / c["steps_per_s"] if g and c else None
        ok = all(r["ok"] for r in (g, c) if r)
        lines.append(f"{m:8} {cell(g and g['steps_per_s'], 11, 2)} {cell(g and g['peak_gpu_mib'], 12, 1)} "
                     f"{cell(c and c['steps_per_s'], 11, 2)} {cell(ratio, 8, 1)}  {'yes' if ok else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="training steps per method on the GPU")
    p.add_argument("--cpu-steps", type=int, default=None, help="training steps per method on the CPU "
                   "(default: 5, or --steps if smaller)")
    p.add_argument("--cpu-only", action="store_true", help="run the CPU part only (any machine)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--size", default="small", help="tiny model size (calibrl.models.SIZES)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--generations", type=int, default=8, help="rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a "
                   "machine shared with other jobs, 1 avoids threads waiting on each other")
    p.add_argument("--json", help="also write every figure to this file")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        p.error(f"--methods: {bad or methods} not in {METHODS}")
    if args.steps < 1 or (args.cpu_steps is not None and args.cpu_steps < 1):
        p.error("--steps and --cpu-steps must be >= 1")
    cpu_steps = args.cpu_steps if args.cpu_steps is not None else min(5, args.steps)
    if args.threads:
        torch.set_num_threads(args.threads)

    usable, status = cuda_status()
    print(status, flush=True)
    run_gpu = usable and not args.cpu_only
    if not usable and not args.cpu_only:
        if shutil.which("nvidia-smi"):
            print("ERROR: nvidia-smi sees a GPU but torch cannot use it: install a CUDA build of torch", flush=True)
            return 1
        print("No CUDA GPU here: nothing to check. Run with --cpu-only to time the CPU part alone.", flush=True)
        return 0

    from calibrl.models import build_tiny_model, save_tiny_model
    from calibrl.tasks import make_dataset, to_hf_dataset

    tmp = tempfile.mkdtemp(prefix="calibrl-gpucheck-")
    try:
        t0 = time.perf_counter()
        model, proc = build_tiny_model("qwen2_5_vl", args.size, seed=0)
        save_tiny_model(model, proc, os.path.join(tmp, "model"))
        n_rows = args.prompts * (max(args.steps, cpu_steps) + 1)
        dataset = to_hf_dataset(make_dataset("digits", "train", n=n_rows, seed=0, expert_style="mismatched"))
        print(f"tiny qwen2_5_vl/{args.size}: {sum(q.numel() for q in model.parameters()) / 1e6:.2f}M parameters, "
              f"{args.prompts} prompts x {args.generations} rollouts, {args.max_new_tokens} new tokens "
              f"(setup {time.perf_counter() - t0:.1f} s)", flush=True)
        del model

        gpu: dict[str, dict] = {}
        cpu: dict[str, dict] = {}
        parts = ([("cuda", torch.bfloat16, args.steps, gpu)] if run_gpu else []) + [("cpu", torch.float32, cpu_steps, cpu)]
        for device, dtype, steps, into in parts:
            for m in methods:
                r = run_method(m, device, dtype, steps, os.path.join(tmp, "model"), dataset, args,
                               os.path.join(tmp, f"{device}-{m}"))
                into[m] = r
                mem = f", peak {r['peak_gpu_mib']:.1f} MiB" if r["peak_gpu_mib"] is not None else ""
                print(f"{device:4} {m:8} {r['steps']} steps in {r['wall_s']:.1f} s: {r['steps_per_s']:.2f} steps/s"
                      f"{mem}, params on {r['param_device']}, {'ok' if r['ok'] else 'FAILED'}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(table(gpu, cpu))
    if not run_gpu:
        print("(CPU part only: " + ("--cpu-only" if usable else "no CUDA here") + ")")
    ok = all(r["ok"] for r in list(gpu.values()) + list(cpu.values()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cuda": status, "gpu": gpu, "cpu": cpu, "ok": ok,
                       "setting": {"size": args.size, "prompts": args.prompts, "generations": args.generations,
                                   "max_new_tokens": args.max_new_tokens, "cpu_threads": torch.get_num_threads()}},
                      f, indent=2)
    if not ok:
        print("FAILED: a method logged a non-finite loss, skipped a step or stopped early (see 'ok' above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
