"""GPU check (issue 14): every method trains in bf16 on CUDA, the expert log-probs are right, and CalibRL's step
time against GRPO at realistic shapes, in one run that writes one JSON and a log into `--out`.

Three parts, in this order, under one wall-clock budget (`--budget-s`; each part is measured, and work the
budget cannot hold is skipped with a note in the JSON rather than overrunning the machine's 10 minutes):

1. correctness: a tiny Qwen2.5-VL trains `--steps` steps of grpo, dapo, calibrl with each gap (token,
   sequence, sequence_mean, constant), luffy and rlplus, 4 prompts x 8 rollouts, weights and compute in bf16;
   fails on a non-finite loss or gradient norm, a skipped optimizer step, or an early stop.
2. expert log-probs: in each calibrl run, the trainer's expert log-probs (from `_expert_forward`, right after
   it ran, same weights) against an independent forward of prompt + images + expert (gpu_bench.py), within
   bf16 tolerance, and clearly closer than the same comparison shifted by one token.
3. overhead: CalibRL vs GRPO at realistic shapes (Qwen2.5-VL-3B widths, `--text-layers`/`--vision-layers`
   deep, G = 8, `--completion-tokens`-token completions and experts, `--image-px` images), interleaved steps,
   medians, peak GPU memory per method, and the split into generation / expert forward / policy
   forward-backward (gpu_bench.overhead_benchmark). Its warm-up step runs the expert check at these shapes.

`--cpu-only` runs all three on the CPU in float32 at toy shapes (tests/test_gpu_check.py), so the script is
checked end to end without a GPU. Without CUDA and without `--cpu-only` it says so and exits 0; a GPU that
nvidia-smi sees but torch cannot use is an error (exit 1). Exit 1 also when a check fails.

    scripts/gpu_check.sh --out DIR [--wheels .whl] [--budget-s 420] [--cpu-only] [--text-layers 12] ...
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_bench  # noqa: E402  (beside this file)
from gpu_bench import Budget, install_expert_check, tag_reward  # noqa: E402

# (name, method, gap): every method, CalibRL with each gap
RUNS = (("grpo", "grpo", None), ("dapo", "dapo", None), ("calibrl_token", "calibrl", "token"),
        ("calibrl_sequence", "calibrl", "sequence"), ("calibrl_sequence_mean", "calibrl", "sequence_mean"),
        ("calibrl_constant", "calibrl", "constant"), ("luffy", "luffy", None), ("rlplus", "rlplus", None))
JSON_NAME, LOG_NAME = "gpu_check.json", "gpu_check.log"


def cuda_status() -> tuple[bool, str]:
    """(usable, one line saying what torch sees)."""
    if torch.cuda.is_available():
        return True, f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    built = torch.version.cuda or "none (a CPU-only build)"
    return False, f"CUDA is not available to torch {torch.__version__} (built with CUDA: {built})"


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "accelerate", "peft", "datasets", "tokenizers",
                 "huggingface_hub", "math-verify", "numpy", "pyarrow"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def log(msg: str) -> None:
    print(msg, flush=True)


def run_method(name: str, method: str, gap: str | None, device: str, dtype: torch.dtype, steps: int,
               model_dir: str, dataset, args, out_dir: str) -> dict:
    """Train one method for `steps` steps on `device` from the saved tiny model; sanity and speed."""
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
            gpu_bench.sync(device)
            self.stamps.append(time.perf_counter())

    model, proc = load_tiny_model(model_dir)
    model.to(device=device, dtype=dtype)
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = CalibRLConfig(
        output_dir=out_dir, method=method, gap=gap or "token", use_cpu=not cuda, bf16=dtype == torch.bfloat16,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, learning_rate=1e-5,
        max_steps=steps, per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations, max_completion_length=args.max_new_tokens,
        reward_weights=[1.0, 0.1, 0.1], dataloader_pin_memory=False,
    )
    clock = StepClock()
    tr = CalibRLTrainer(model=model, reward_funcs=[accuracy_reward, format_reward, tag_reward], args=cfg,
                        train_dataset=dataset, processing_class=proc, callbacks=[clock])
    tr.remove_callback(PrinterCallback)  # one summary line per run instead of every step's log dict
    expert: dict | None = None
    if method == "calibrl":
        expert = {}
        install_expert_check(tr, dtype, expert)
    t0 = time.perf_counter()
    tr.train()
    wall = time.perf_counter() - t0
    logs = [h for h in tr.state.log_history if "loss" in h]
    s = clock.stamps
    steps_per_s = (len(s) - 1) / (s[-1] - s[0]) if len(s) >= 2 and s[-1] > s[0] else len(s) / wall
    result = {
        "method": method, "gap": gap, "device": device, "dtype": str(dtype).replace("torch.", ""),
        "steps": len(s), "wall_s": wall, "steps_per_s": steps_per_s,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "losses": [h["loss"] for h in logs],
        "finite": all(math.isfinite(h["loss"]) and math.isfinite(h.get("grad_norm", 0.0)) for h in logs),
        "skipped_steps": tr.skipped_steps,
        "nonzero_grad_steps": sum(h.get("grad_norm", 0.0) > 0 for h in logs),
        "guide_loss_nonzero_steps": sum(abs(h.get("calibrl/guide_loss", 0.0)) > 0 for h in logs),
        "mean_reward": sum(h.get("reward", 0.0) for h in logs) / max(1, len(logs)),
        "param_device": str(next(tr.model.parameters()).device),
        "param_dtype": str(next(tr.model.parameters()).dtype).replace("torch.", ""),
    }
    result["ok"] = result["finite"] and result["skipped_steps"] == 0 and len(logs) == steps
    if expert is not None:
        result["expert_logps"] = expert
        result["ok"] = result["ok"] and expert.get("ok", False)
    del tr, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def write_json(report: dict, paths: list[str]) -> None:
    """Write the report now (after every part), atomically, so a run stopped by its time limit still leaves
    everything measured so far."""
    for path in paths:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, path)


def correctness_table(runs: dict[str, dict]) -> str:
    head = f"{'run':22} {'steps/s':>8} {'peak MiB':>9} {'expert max|Δ|':>14} {'shifted':>8}  ok"
    lines = [head, "-" * len(head)]
    for name, r in runs.items():
        peak = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        ex = r.get("expert_logps", {}).get("experts") or []
        dmax = f"{max(e['max_abs'] for e in ex):.2e}" if ex else "-"
        shift = f"{min(e['shifted_mean_abs'] for e in ex):.3f}" if ex else "-"
        lines.append(f"{name:22} {r['steps_per_s']:8.2f} {peak:>9} {dmax:>14} {shift:>8}  {'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for gpu_check.json (the log is written there by gpu_check.sh)")
    p.add_argument("--json", help="also write the JSON to this file")
    p.add_argument("--cpu-only", action="store_true", help="everything on the CPU in float32 at toy shapes")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for all parts (seconds)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="weights and compute (auto: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g = p.add_argument_group("1-2. correctness (tiny model)")
    g.add_argument("--runs", default=",".join(r[0] for r in RUNS), help="subset of " + ",".join(r[0] for r in RUNS))
    g.add_argument("--steps", type=int, default=3, help="training steps per run")
    g.add_argument("--size", default=None, help="tiny model size (default: small on CUDA, nano on CPU)")
    g.add_argument("--prompts", type=int, default=None, help="prompts per step (default 4 on CUDA, 2 on CPU)")
    g.add_argument("--generations", type=int, default=None, help="rollouts per prompt (default 8 on CUDA, 4 on CPU)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="(default 40 on CUDA, 8 on CPU)")
    o = p.add_argument_group("3. overhead at realistic shapes")
    o.add_argument("--skip-overhead", action="store_true")
    o.add_argument("--widths", choices=sorted(gpu_bench.WIDTHS), default=None,
                   help="layer widths (default qwen2.5-vl-3b on CUDA, tiny on CPU)")
    o.add_argument("--text-layers", type=int, default=None, help="(default 12 of the 3B's 36 on CUDA; 2 on CPU)")
    o.add_argument("--vision-layers", type=int, default=None, help="(default 8 of the 3B's 32 on CUDA; 2 on CPU)")
    o.add_argument("--completion-tokens", type=int, default=None, help="completion and expert length "
                   "(default 1024 on CUDA, 16 on CPU)")
    o.add_argument("--image-px", type=int, default=None, help="image side (default 672 on CUDA, 56 on CPU)")
    o.add_argument("--bench-generations", type=int, default=8, help="G for the overhead part")
    o.add_argument("--timed-steps", type=int, default=None, help="timed steps per method (default 6; 2 on CPU)")
    o.add_argument("--reserve-s", type=float, default=10.0, help="budget kept back for writing the results")
    args = p.parse_args(argv)

    names = [r.strip() for r in args.runs.split(",") if r.strip()]
    known = {r[0]: r for r in RUNS}
    bad = [n for n in names if n not in known]
    if bad or not names:
        p.error(f"--runs: {bad or names} not in {tuple(known)}")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget(args.budget_s)

    usable, status = cuda_status()
    log(status)
    if not usable and not args.cpu_only:
        if shutil.which("nvidia-smi"):
            log("ERROR: nvidia-smi sees a GPU but torch cannot use it: install a CUDA build of torch")
            return 1
        log("No CUDA GPU here: nothing to check. Run with --cpu-only to run every part on the CPU.")
        return 0
    cuda = not args.cpu_only
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype)

    def pick(value, on_cuda, on_cpu):
        return value if value is not None else (on_cuda if cuda else on_cpu)

    args.size = pick(args.size, "small", "nano")
    args.prompts = pick(args.prompts, 4, 2)
    args.generations = pick(args.generations, 8, 4)
    args.max_new_tokens = pick(args.max_new_tokens, 40, 8)
    bench = argparse.Namespace(
        widths=pick(args.widths, "qwen2.5-vl-3b", "tiny"), text_layers=pick(args.text_layers, 12, 2),
        vision_layers=pick(args.vision_layers, 8, 2), completion_tokens=pick(args.completion_tokens, 1024, 16),
        image_px=pick(args.image_px, 672, 56), generations=args.bench_generations,
        timed_steps=pick(args.timed_steps, 6, 2), reserve_s=args.reserve_s)

    paths = []
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        paths.append(os.path.join(args.out, JSON_NAME))
    if args.json:
        paths.append(args.json)
    report: dict = {
        "cuda": status, "device": device, "dtype": str(dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name(0) if cuda else None, "versions": versions(),
        "budget_s": args.budget_s, "phase_s": {}, "skipped": [], "command": sys.argv[1:] if argv is None else argv,
        "correctness": {"setting": {"size": args.size, "prompts": args.prompts, "generations": args.generations,
                                    "max_new_tokens": args.max_new_tokens, "steps": args.steps}, "runs": {}},
        "overhead": None,
    }
    log(f"versions: {report['versions']}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a weight-loading bar per run would bury the log

    from calibrl.models import build_tiny_model, save_tiny_model
    from calibrl.tasks import make_dataset, to_hf_dataset

    tmp = tempfile.mkdtemp(prefix="calibrl-gpucheck-")
    try:
        # 1-2. correctness and expert log-probs on the tiny model
        t0 = time.perf_counter()
        model, proc = build_tiny_model("qwen2_5_vl", args.size, seed=0)
        save_tiny_model(model, proc, os.path.join(tmp, "model"))
        dataset = to_hf_dataset(make_dataset("digits", "train", n=args.prompts * (args.steps + 1), seed=0,
                                             expert_style="mismatched"))
        log(f"correctness: tiny qwen2_5_vl/{args.size}, {sum(q.numel() for q in model.parameters()) / 1e6:.2f}M "
            f"parameters, {args.prompts} prompts x {args.generations} rollouts, {args.max_new_tokens} new tokens, "
            f"{args.steps} steps, {device} {report['dtype']}")
        del model
        runs = report["correctness"]["runs"]
        longest = 0.0
        for name in names:
            _, method, gap = known[name]
            if runs and budget.left() < 2 * longest + args.reserve_s:
                report["skipped"].append(f"correctness run {name}: time budget ({budget.left():.0f} s left)")
                log("skipped: " + report["skipped"][-1])
                continue
            t = time.perf_counter()
            r = run_method(name, method, gap, device, dtype, args.steps, os.path.join(tmp, "model"), dataset,
                           args, os.path.join(tmp, name))
            longest = max(longest, time.perf_counter() - t)
            runs[name] = r
            mem = f", peak {r['peak_gpu_mib']:.1f} MiB" if r["peak_gpu_mib"] is not None else ""
            ex = r.get("expert_logps", {}).get("experts") or []
            exs = (f", expert log-probs max|Δ| {max(e['max_abs'] for e in ex):.2e} (shifted by one token: "
                   f"{min(e['shifted_mean_abs'] for e in ex):.3f})") if ex else ""
            log(f"{device:4} {name:22} {r['steps']} steps in {r['wall_s']:.1f} s: {r['steps_per_s']:.2f} steps/s"
                f"{mem}, params {r['param_dtype']} on {r['param_device']}{exs}, {'ok' if r['ok'] else 'FAILED'}")
        report["phase_s"]["correctness"] = time.perf_counter() - t0
        log("\n" + correctness_table(runs) + "\n")
        write_json(report, paths)

        # 3. overhead at realistic shapes
        if args.skip_overhead:
            report["skipped"].append("overhead: --skip-overhead")
        elif budget.left() < 60 + args.reserve_s:
            report["skipped"].append(f"overhead: time budget ({budget.left():.0f} s left, needs 60+)")
            log("skipped: " + report["skipped"][-1])
        else:
            t0 = time.perf_counter()
            try:
                report["overhead"] = ov = gpu_bench.overhead_benchmark(bench, device, dtype, budget, log, tmp)
            except Exception as e:  # noqa: BLE001  (one try on the GPU: keep what part 1-2 found, say what broke)
                report["overhead"] = ov = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}",
                                           "traceback": traceback.format_exc()[-3000:]}
                log(f"overhead: FAILED with {ov['error']}\n{ov['traceback']}")
            report["phase_s"]["overhead"] = time.perf_counter() - t0
            report["skipped"] += [f"overhead: {n}" for n in ov.get("notes", [])]
            if "ratio_calibrl_over_grpo" in ov:
                med = ov["median_s"]
                log(f"overhead: median step GRPO {med['grpo']['step']:.3f} s, CalibRL {med['calibrl']['step']:.3f} s,"
                    f" ratio {ov['ratio_calibrl_over_grpo']:.3f} over {ov['timed_steps_per_method']} interleaved "
                    f"steps each; CalibRL's extra {ov['extra_s_per_step']:+.3f} s = " + ", ".join(
                        f"{k} {v:+.3f}" for k, v in ov["extra_split_s"].items()))
                for m in ("grpo", "calibrl"):
                    mm = med[m]
                    mem = (f", peak {ov['peak_gpu_mib'][m]:.0f} MiB (step {ov['step_gpu_mib'][m]:.0f})"
                           if "peak_gpu_mib" in ov else "")
                    log(f"overhead: {m:7} generation {mm['generation']:.3f} s, expert forward "
                        f"{mm['expert_forward']:.3f} s, other scoring {mm['scoring_other']:.3f} s, policy fwd-bwd "
                        f"{mm['policy_fwd_bwd']:.3f} s{mem}")
            ex = ov.get("expert_logps", {}).get("experts") or []
            if ex:
                log(f"overhead: expert log-probs at these shapes: max|Δ| {max(e['max_abs'] for e in ex):.3e}, "
                    f"mean|Δ| {max(e['mean_abs'] for e in ex):.3e} over {ex[0]['tokens']} tokens (shifted by one "
                    f"token: {min(e['shifted_mean_abs'] for e in ex):.3f}), "
                    + ("ok" if ov["expert_logps"]["ok"] else "FAILED"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    checks = [r["ok"] for r in report["correctness"]["runs"].values()]
    if report["overhead"] is not None:
        checks.append(report["overhead"].get("ok", False))
    report["ok"] = bool(checks) and all(checks)
    report["complete"] = not report["skipped"]
    report["elapsed_s"] = budget.elapsed()
    write_json(report, paths)
    log(f"done in {budget.elapsed():.0f} s of a {args.budget_s:.0f} s budget; "
        + ("all checks passed" if report["ok"] else "FAILED: see 'ok' in the JSON")
        + ("" if report["complete"] else f"; skipped: {'; '.join(report['skipped'])}")
        + ("" if cuda else " (CPU dry run: --cpu-only)"))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
