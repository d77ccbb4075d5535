"""Soak: 500 CalibRL steps with injected faults; every fault must be counted, and memory must stay flat.

The tiny demo setting (tiny Qwen2.5-VL, digits of difficulty 1, mismatched expert, 8 rollouts per prompt,
48 new tokens, lr 1e-4 constant) trains from scratch for `--steps` steps while:
- the accuracy reward raises for 5% of completions: each completion's fate is a seeded draw on its text, so
  the batch call and the guard's one-at-a-time retry agree, and the benchmark tallies exactly what it
  injected. The guard must count each one (`trainer.reward_faults.totals["errors"]`), no more, no less;
- 1% of dataset rows are bad (half an unreadable image, half an empty answer), loaded with
  `on_error="report"`: they must be reported (warning + `summary.bad_rows`), left out, and be exactly the
  rows we broke.
Resident memory (/proc/self/status: VmRSS now, VmHWM peak) is read every 50 steps; the table gives both at
step 50 and at the last step, and the growth between them.

An untrained model is never right, so accuracy alone would give zero-variance groups (all advantages 0, no
gradient, guidance off); a soft reward for the format tags present (weight 0.1) keeps real gradients and the
guidance term live for the whole run.

    python -m benchmarks.soak [--steps 500] [--size nano] [--prompts 4] [--threads 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings

import torch

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
BAD_KINDS = ("unreadable image", "empty answer")


def proc_status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # the kernel reports kB
    raise RuntimeError(f"/proc/self/status has no {field} (not Linux?)")


def tag_reward(completions: list, **kwargs) -> list[float]:
    """Fraction of the four format tags present: varies within groups even for an untrained model."""
    from calibrl.rewards import completion_text

    return [sum(t in completion_text(c) for t in TAGS) / len(TAGS) for c in completions]


class FaultyAccuracy:
    """`accuracy_reward` that raises for a seeded `rate` of completions, and counts what it injected.

    The decision is a function of (seed, completion text) alone, so the guard's per-sample retry of a failed
    batch raises for exactly the completions the batch call found bad. The guard always calls with the whole
    batch first; the tally is taken there (a batch of one is counted too, retries come after a batch call)."""

    __name__ = "accuracy_reward"

    def __init__(self, rate: float, seed: int):
        self.rate, self.seed = rate, seed
        self.injected = 0  # completions whose reward call raised on purpose
        self.scored = 0  # completions scored in batch calls
        self._retrying = 0  # per-sample calls still expected after a failed batch call

    def bad(self, completion) -> bool:
        from calibrl.rewards import completion_text

        return random.Random(f"soak/{self.seed}/{completion_text(completion)}").random() < self.rate

    def __call__(self, completions: list, answer: list | None = None, **kwargs) -> list[float]:
        from calibrl.rewards import accuracy_reward

        flags = [self.bad(c) for c in completions]
        if self._retrying:  # one-at-a-time retry of a batch that raised: already counted
            self._retrying -= 1
        else:
            self.scored += len(completions)
            self.injected += sum(flags)
            if any(flags):
                self._retrying = len(completions)
        if any(flags):
            raise RuntimeError("injected reward fault")
        return accuracy_reward(completions, answer=answer, **kwargs)


def soak_rows(n: int, bad_rate: float, seed: int) -> tuple[list[dict], dict[int, str]]:
    """`n` digits rows as raw records (PNG bytes, like a parquet file holds them), round(bad_rate * n) of them
    broken. Returns the rows and {row index: what is wrong with it}."""
    from calibrl.tasks import make_dataset

    rows = []
    for r in make_dataset("digits", "train", n=n, seed=seed, expert_style="mismatched", difficulty=[1]):
        images = []
        for im in r["images"]:
            buffer = io.BytesIO()
            im.save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
        rows.append({**r, "images": images, "meta": json.dumps(r["meta"])})
    n_bad = round(bad_rate * n)
    bad = sorted(random.Random(f"soak/rows/{seed}").sample(range(n), n_bad))
    broken = {}
    for k, i in enumerate(bad):
        kind = BAD_KINDS[k % len(BAD_KINDS)]
        if kind == "unreadable image":
            rows[i]["images"] = [{"bytes": b"\x89PNG\r\n\x1a\n truncated", "path": None}]
        else:
            rows[i]["answer"] = ""
        broken[i] = kind
    return rows, broken


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--size", default="nano", help="tiny Qwen2.5-VL size (calibrl.models.SIZES)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (x --generations rollouts)")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rows", type=int, default=1000, help="dataset rows before the bad ones are left out")
    p.add_argument("--fault-rate", type=float, default=0.05, help="share of reward calls that raise")
    p.add_argument("--bad-row-rate", type=float, default=0.01, help="share of dataset rows that are broken")
    p.add_argument("--every", type=int, default=50, help="read memory every this many steps")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures (and the memory trace) here")
    args = p.parse_args(argv)
    if args.steps < args.every:
        p.error(f"--steps ({args.steps}) must be at least --every ({args.every})")
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from calibrl import CalibRLConfig, CalibRLTrainer
    from calibrl.data import load_dataset_for_training
    from calibrl.models import build_tiny_model
    from calibrl.rewards import format_reward

    t_setup = time.perf_counter()
    raw, broken = soak_rows(args.rows, args.bad_row_rate, args.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset, summary = load_dataset_for_training(raw, on_error="report")
    reported_rows = sorted({e.row for e in summary.bad_rows})
    warned = any("on_error='report'" in str(w.message) for w in caught)

    model, proc = build_tiny_model("qwen2_5_vl", args.size, seed=args.seed)
    faulty = FaultyAccuracy(args.fault_rate, args.seed)
    out = tempfile.mkdtemp(prefix="calibrl-soak-")
    cfg = CalibRLConfig(
        output_dir=out, method="calibrl", use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=args.seed, max_steps=args.steps, learning_rate=1e-4,
        lr_scheduler_type="constant", per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations, max_completion_length=args.max_new_tokens, temperature=1.0, beta=0.0,
        reward_weights=[1.0, 0.1, 0.1], activation_checkpointing=False,
    )
    trace: list[dict] = []

    class Probe(TrainerCallback):
        """Memory, faults and speed every `--every` steps (a line on stdout, a record in the trace)."""

        def __init__(self):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step % args.every and state.global_step != args.steps:
                return
            rec = {"step": state.global_step, "rss_mib": proc_status_mib("VmRSS"),
                   "peak_rss_mib": proc_status_mib("VmHWM"), "elapsed_s": time.perf_counter() - self.t0,
                   "reward_errors": tr.reward_faults.totals["errors"], "injected": faulty.injected,
                   "mean_length": state.log_history[-1].get("completions/mean_length") if state.log_history else None,
                   # Python-level objects: flat while RSS grows means the growth is below Python (allocator, torch)
                   "python_blocks": sys.getallocatedblocks(), "gc_objects": len(gc.get_objects())}
            trace.append(rec)
            print(f"step {rec['step']:4d}  {rec['elapsed_s']:6.0f} s  RSS {rec['rss_mib']:7.1f} MiB  "
                  f"peak {rec['peak_rss_mib']:7.1f} MiB  reward faults counted {rec['reward_errors']} / "
                  f"injected {rec['injected']}", flush=True)

    tr = CalibRLTrainer(model=model, reward_funcs=[faulty, format_reward, tag_reward], args=cfg,
                        train_dataset=dataset, processing_class=proc, callbacks=[Probe()])
    tr.remove_callback(PrinterCallback)
    setup_s = time.perf_counter() - t_setup
    t0 = time.perf_counter()
    tr.train()
    train_s = time.perf_counter() - t0

    logs = [h for h in tr.state.log_history if "loss" in h]
    at = {r["step"]: r for r in trace}
    first, last = at[args.every], trace[-1]
    result = {
        "setting": {"model": f"tiny qwen2_5_vl/{args.size}", "method": "calibrl", "steps": args.steps,
                    "prompts": args.prompts, "generations": args.generations, "max_new_tokens": args.max_new_tokens,
                    "rows": args.rows, "threads": torch.get_num_threads(), "seed": args.seed},
        "setup_s": setup_s, "train_s": train_s, "s_per_step": train_s / args.steps,
        "reward_faults": {"injected": faulty.injected, "counted": dict(tr.reward_faults.totals),
                          "completions_scored": faulty.scored,
                          "equal": tr.reward_faults.totals["errors"] == faulty.injected},
        "bad_rows": {"injected": sorted(broken), "kinds": {str(k): v for k, v in broken.items()},
                     "reported": reported_rows, "warned": warned, "rows_kept": len(dataset),
                     "equal": reported_rows == sorted(broken) and len(dataset) == args.rows - len(broken)},
        "memory_mib": {"step_a": first["step"], "step_b": last["step"],
                       "rss_a": first["rss_mib"], "rss_b": last["rss_mib"], "rss_growth": last["rss_mib"] - first["rss_mib"],
                       "peak_a": first["peak_rss_mib"], "peak_b": last["peak_rss_mib"],
                       "peak_growth": last["peak_rss_mib"] - first["peak_rss_mib"]},
        "training": {"global_step": tr.state.global_step, "skipped_steps": tr.skipped_steps,
                     "nonfinite_losses": sum(not math.isfinite(h["loss"]) for h in logs),
                     "guide_loss_nonzero_steps": sum(abs(h.get("calibrl/guide_loss", 0.0)) > 0 for h in logs),
                     "mean_reward_first_50": _mean(h.get("reward") for h in logs[:50]),
                     "mean_reward_last_50": _mean(h.get("reward") for h in logs[-50:])},
        "trace": trace,
    }
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _mean(values) -> float:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else float("nan")


def report(r: dict) -> str:
    s, f, b, m, t = r["setting"], r["reward_faults"], r["bad_rows"], r["memory_mib"], r["training"]
    yes = {True: "yes", False: "NO"}
    lines = [
        f"soak: {s['steps']} steps of {s['method']} on {s['model']}, {s['prompts']} prompts x {s['generations']} "
        f"rollouts, {s['threads']} threads: {r['train_s']:.0f} s ({r['s_per_step']:.2f} s/step), setup {r['setup_s']:.0f} s",
        "",
        f"{'fault':28} {'injected':>9} {'counted':>9}  equal",
        f"{'reward calls that raise':28} {f['injected']:9d} {f['counted']['errors']:9d}  {yes[f['equal']]}"
        f"   (of {f['completions_scored']} completions scored)",
        f"{'bad dataset rows':28} {len(b['injected']):9d} {len(b['reported']):9d}  {yes[b['equal']]}"
        f"   (warned: {yes[b['warned']]}, {b['rows_kept']} rows kept)",
        "",
        f"{'memory (MiB)':28} {'step ' + str(m['step_a']):>9} {'step ' + str(m['step_b']):>9}  growth",
        f"{'RSS now (VmRSS)':28} {m['rss_a']:9.1f} {m['rss_b']:9.1f}  {m['rss_growth']:+.1f}",
        f"{'peak RSS (VmHWM)':28} {m['peak_a']:9.1f} {m['peak_b']:9.1f}  {m['peak_growth']:+.1f}",
        "",
        f"optimizer steps {t['global_step']}, skipped {t['skipped_steps']}, non-finite losses {t['nonfinite_losses']}, "
        f"guidance active on {t['guide_loss_nonzero_steps']} steps; mean reward first/last 50 steps "
        f"{t['mean_reward_first_50']:.3f} / {t['mean_reward_last_50']:.3f}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
