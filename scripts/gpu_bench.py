"""Pieces of scripts/gpu_check.py: a Qwen2.5-VL at realistic shapes, the expert log-prob check, phase clocks,
and the interleaved CalibRL-vs-GRPO step-time benchmark.

Realistic shapes: the widths of Qwen2.5-VL-3B-Instruct (its config.json, written out below since nothing can
be downloaded on the GPU machine) with fewer layers, randomly initialised; our small byte-level tokenizer
stands in for Qwen's (ids above its vocabulary decode to nothing), so rewards are ~0 but every tensor has
the real model's shapes: vocabulary 151936, hidden 2048, MLP 11008, 16 heads / 2 KV heads, a 1280-wide ViT.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
from collections import defaultdict
from typing import Callable

import torch

# Qwen/Qwen2.5-VL-3B-Instruct config.json (text part and vision_config), as published.
QWEN2_5_VL_3B = {
    "text": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, mrope_section=[16, 24, 24], hidden_act="silu",
                 tie_word_embeddings=True),
    "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", tokens_per_second=2),
}
# The same structure at toy widths, for the CPU dry run (--cpu-only): every code path, seconds not minutes.
TINY_VL = {
    "text": dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, mrope_section=[2, 3, 3], hidden_act="silu",
                 tie_word_embeddings=True),
    "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[1], hidden_act="silu", tokens_per_second=2),
}
WIDTHS = {"qwen2.5-vl-3b": QWEN2_5_VL_3B, "tiny": TINY_VL}
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def tag_reward(completions: list, **kwargs) -> list[float]:
    """Fraction of the four format tags present. An untrained model almost never answers correctly, so with
    accuracy and strict format alone every group has zero variance, every advantage is 0 and the check would
    time zero gradients; this soft reward varies within groups and gives every method a real gradient."""
    from calibrl.rewards import completion_text

    return [sum(t in completion_text(c) for t in TAGS) / len(TAGS) for c in completions]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------
# The model and the data
# ----------------------------------------------------------------------------------------------------------
def fullatt_blocks(depth: int, every: int = 8) -> list[int]:
    """Qwen2.5-VL's ViT attends globally in every 8th block (7, 15, 23, 31 of 32) and in windows elsewhere;
    a shallower tower keeps that rhythm, with at least its last block global."""
    return [i for i in range(every - 1, depth, every)] or [depth - 1]


def build_vl_model(widths: str, text_layers: int, vision_layers: int, image_px: int, device: str,
                   dtype: torch.dtype, seed: int = 0):
    """A randomly initialised Qwen2.5-VL of `widths` with the given depths, on `device` in `dtype`, and a
    processor whose images are resized to about `image_px` x `image_px` (sides rounded to 28 px)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from calibrl.models import TinyQwen2_5_VLProcessor, build_tokenizer, chat_template

    spec = WIDTHS[widths]
    tok = build_tokenizer(family="qwen2_5_vl")
    ids = tok.get_vocab()
    t = dict(spec["text"])
    t.update(num_hidden_layers=text_layers, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
             pad_token_id=ids["<|endoftext|>"],
             rope_parameters={"rope_type": "default", "rope_theta": t.pop("rope_theta"),
                              "mrope_section": t.pop("mrope_section")})
    tie = t.pop("tie_word_embeddings")
    v = dict(spec["vision"], depth=vision_layers, fullatt_block_indexes=fullatt_blocks(vision_layers))
    if len(tok) > t["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tok)} ids, more than vocab_size={t['vocab_size']}")
    config = Qwen2_5_VLConfig(
        text_config=t, vision_config=v, tie_word_embeddings=tie,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.to(dtype)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.train()
    side = max(28, round(image_px / 28) * 28)
    proc = TinyQwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side),
        tokenizer=tok, chat_template=chat_template("qwen2_5_vl"))
    return model, proc


def long_expert_rows(tokenizer, n: int, expert_tokens: int, image_px: int, seed: int = 0) -> list[dict]:
    """Digits rows with one image resized to `image_px` square and an expert solution of about
    `expert_tokens` tokens (the reasoning padded with digits, answer tags intact)."""
    from calibrl.tasks import make_dataset
    from calibrl.tasks.common import solution_text

    rows = make_dataset("digits", "train", n=n, seed=seed, expert_style="mismatched", difficulty=1)
    out = []
    for i, row in enumerate(rows):
        think = row["solution"].split("<think>", 1)[1].split("</think>", 1)[0]
        sol = solution_text(think, row["answer"])
        missing = expert_tokens - len(tokenizer(sol, add_special_tokens=False)["input_ids"])
        if missing > 0:  # " d" is two tokens (space, digit): each digit is its own token in this tokenizer
            pad = " ".join(str((i + k) % 10) for k in range(missing // 2))
            sol = solution_text(f"{think} {pad}", row["answer"])
        images = [im.convert("RGB").resize((image_px, image_px)) for im in row["images"][:1]]
        out.append({**row, "images": images, "solution": sol})
    return out


# ----------------------------------------------------------------------------------------------------------
# The expert log-prob check
# ----------------------------------------------------------------------------------------------------------
TOLERANCE = {  # (max |Δ| per token, mean |Δ|) between the trainer's expert log-probs and ours
    torch.float32: (1e-3, 1e-4),
    torch.bfloat16: (0.25, 0.05),
}


def _messages(prompt: list[dict]) -> list[dict]:
    """Chat messages as our template reads them (image blocks without their null `text` field)."""
    out = []
    for m in prompt:
        content = m["content"]
        if not isinstance(content, str):
            content = [{"type": "image"} if b.get("type") == "image" else {"type": "text", "text": b.get("text")}
                       for b in content]
        out.append({"role": m["role"], "content": content})
    return out


@torch.no_grad()
def independent_expert_logps(model, processor, row: dict, expert_ids: list[int], temperature: float = 1.0):
    """log π(expert token | prompt + images + expert prefix) from one plain forward of one sequence: the
    processor on the chat-templated prompt and the row's images, the expert ids appended, the logits'
    log-softmax. Shares no code with the trainer's path (TRL's prompt tokenisation, padding, fused LM head)."""
    device = next(model.parameters()).device
    text = processor.apply_chat_template(_messages(row["prompt"]), add_generation_prompt=True, tokenize=False)
    images = row.get("images") or None
    enc = processor(text=[text], images=images, return_tensors="pt")
    p_ids = enc.pop("input_ids")
    enc.pop("attention_mask", None)
    e = torch.tensor([expert_ids])
    ids = torch.cat([p_ids, e], 1).to(device)
    extra = {k: v.to(device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
    if "mm_token_type_ids" in extra:  # per-token: the expert's tokens are text (0)
        extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(e).to(device)], 1)
    if "pixel_values" in extra:
        extra["pixel_values"] = extra["pixel_values"].to(next(model.parameters()).dtype)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
    P = p_ids.size(1)
    logits = logits[0, P - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, e[0].to(device).unsqueeze(-1)).squeeze(-1)


def expected_expert_ids(tr, row: dict) -> list[int]:
    """The expert ids the trainer should have scored, from the tokenizer directly: the solution's tokens,
    cut to leave room for EOS inside max_completion_length, then EOS."""
    ids = tr.processing_class.tokenizer(row[tr.args.expert_column], add_special_tokens=False)["input_ids"]
    return ids[: tr.max_completion_length - 1] + [tr.eos_token_ids[0]]


def install_expert_check(tr, dtype: torch.dtype, into: dict, calls: int = 1) -> None:
    """Wrap `tr._expert_forward` so that its first `calls` calls are checked, right after the trainer's own
    forward (same weights), against `independent_expert_logps` for every expert in the batch. Results are
    appended to `into["experts"]`; `into["ok"]` says whether all were within the dtype's tolerance, the ids
    matched the tokenizer's, and a one-token shift of our log-probs was clearly further off (so the check
    can tell an aligned result from a misaligned one on this model)."""
    original = tr._expert_forward
    tol_max, tol_mean = TOLERANCE[dtype]
    into.setdefault("experts", [])
    into.update(tolerance={"max_abs": tol_max, "mean_abs": tol_mean}, ok=False)
    state = {"left": calls}

    def checked(inputs, rows, expert_ids):
        logps, entropies, e_mask = original(inputs, rows, expert_ids)
        if state["left"] > 0 and inputs:
            state["left"] -= 1
            for k, r in enumerate(rows):
                ours = independent_expert_logps(tr.model, tr.processing_class, inputs[r], expert_ids[k],
                                                tr.temperature)
                n = int(e_mask[k].sum())
                theirs = logps[k, :n].float()
                d = (theirs - ours[:n]).abs()
                shift = (theirs[1:] - ours[: n - 1]).abs().mean().item() if n > 1 else float("nan")
                into["experts"].append({
                    "tokens": n, "max_abs": d.max().item(), "mean_abs": d.mean().item(),
                    "shifted_mean_abs": shift, "mean_logp": theirs.mean().item(),
                    "ids_match": list(expert_ids[k]) == expected_expert_ids(tr, inputs[r]),
                    "finite": bool(torch.isfinite(theirs).all()),
                })
            into["ok"] = bool(into["experts"]) and all(
                e["ids_match"] and e["finite"] and e["max_abs"] <= tol_max and e["mean_abs"] <= tol_mean
                and e["shifted_mean_abs"] >= 4 * max(e["mean_abs"], tol_mean / 10) for e in into["experts"])
        return logps, entropies, e_mask

    tr._expert_forward = checked


# ----------------------------------------------------------------------------------------------------------
# Clocks
# ----------------------------------------------------------------------------------------------------------
class PhaseClock:
    """Seconds spent inside chosen trainer methods, with the GPU synchronised at each edge so that queued
    kernels are charged to the method that launched them."""

    def __init__(self, device: str):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, obj, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **k):
            sync(self.device)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(self.device)
                self.seconds[key] += time.perf_counter() - t

        setattr(obj, name, timed)

    def take(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds.clear()
        return out


class Budget:
    """A wall-clock deadline for the whole check; phases ask before starting work they can measure."""

    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------
def make_bench_trainer(method: str, model, proc, dataset, opts, out_dir: str, device: str, dtype: torch.dtype):
    from calibrl import CalibRLConfig, CalibRLTrainer
    from calibrl.rewards import accuracy_reward, format_reward

    cfg = CalibRLConfig(
        output_dir=out_dir, method=method, use_cpu=device != "cuda", bf16=dtype == torch.bfloat16, report_to="none",
        save_strategy="no", disable_tqdm=True, seed=0, learning_rate=0.0, max_steps=10_000,
        per_device_train_batch_size=opts.generations, num_generations=opts.generations,
        max_completion_length=opts.completion_tokens, reward_weights=[1.0, 0.1, 0.1], dataloader_pin_memory=False,
    )
    tr = CalibRLTrainer(model=model, reward_funcs=[accuracy_reward, format_reward, tag_reward], args=cfg,
                        train_dataset=dataset, processing_class=proc)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1  # normally set by the training loop
    return tr


def step_split(s: dict[str, float]) -> dict[str, float]:
    """One step's seconds split into generation, expert forward, the rest of scoring, and the policy
    forward-backward (the step less `_generate_and_score_completions`, which holds the first two)."""
    gs = s.get("generate_and_score", 0.0)
    gen, exp = s.get("generation", 0.0), s.get("expert_forward", 0.0)
    return {"step": s["step"], "generation": gen, "expert_forward": exp,
            "scoring_other": max(0.0, gs - gen - exp), "policy_fwd_bwd": max(0.0, s["step"] - gs)}


def overhead_benchmark(opts, device: str, dtype: torch.dtype, budget: Budget, log: Callable[[str], None],
                       tmp: str) -> dict:
    """Median step time and peak memory of CalibRL and GRPO on the same realistic-shape model (one copy each,
    same seed, learning rate 0: both sample the same completions), steps interleaved, alternating which goes
    first; step 0 of each is a warm-up (and carries the expert log-prob check) and is not timed."""
    from calibrl.tasks import to_hf_dataset

    cuda = device == "cuda"
    t0 = time.perf_counter()
    model, proc = build_vl_model(opts.widths, opts.text_layers, opts.vision_layers, opts.image_px, device, dtype)
    rows = long_expert_rows(proc.tokenizer, n=opts.timed_steps + 4, expert_tokens=opts.completion_tokens,
                            image_px=opts.image_px)
    dataset = to_hf_dataset(rows)
    n_params = sum(p.numel() for p in model.parameters())
    models = {"grpo": model, "calibrl": copy.deepcopy(model)}
    trainers, clocks = {}, {}
    for m in ("grpo", "calibrl"):
        trainers[m] = make_bench_trainer(m, models[m], proc, dataset, opts, f"{tmp}/bench-{m}", device, dtype)
        clocks[m] = PhaseClock(device)
        clocks[m].wrap(trainers[m], "_generate_single_turn", "generation")
        clocks[m].wrap(trainers[m], "_generate_and_score_completions", "generate_and_score")
    expert_check: dict = {}
    install_expert_check(trainers["calibrl"], dtype, expert_check)  # the warm-up step's expert only
    clocks["calibrl"].wrap(trainers["calibrl"], "_expert_forward", "expert_forward")
    setup_s = time.perf_counter() - t0
    prompt_tokens = len(proc(text=[proc.apply_chat_template(_messages(rows[0]["prompt"]), add_generation_prompt=True,
                                                            tokenize=False)], images=rows[0]["images"])["input_ids"][0])
    setting = {
        "widths": opts.widths, "text_layers": opts.text_layers, "vision_layers": opts.vision_layers,
        "parameters_millions": round(n_params / 1e6, 1), "generations": opts.generations, "prompts_per_step": 1,
        "completion_tokens": opts.completion_tokens, "expert_tokens": opts.completion_tokens,
        "image_px": opts.image_px, "prompt_tokens": prompt_tokens, "dtype": str(dtype).replace("torch.", ""),
        "device": device, "learning_rate": 0.0, "optimizer_step": "not run (identical for both methods)",
        "fullatt_block_indexes": fullatt_blocks(opts.vision_layers),
    }
    log(f"overhead: {opts.widths} widths, {opts.text_layers} text / {opts.vision_layers} vision layers, "
        f"{n_params / 1e6:.0f}M parameters, G={opts.generations}, {opts.completion_tokens}-token completions "
        f"and experts, {opts.image_px}px image ({prompt_tokens} prompt tokens); setup {setup_s:.1f} s")

    batches = iter(trainers["grpo"].get_train_dataloader())
    steps: dict[str, list[dict]] = {"grpo": [], "calibrl": []}
    peak: dict[str, list[float]] = {"grpo": [], "calibrl": []}
    step_mem: dict[str, list[float]] = {"grpo": [], "calibrl": []}
    lengths: dict[str, list[float]] = {"grpo": [], "calibrl": []}
    losses: dict[str, list[float]] = {"grpo": [], "calibrl": []}  # warm-up included
    notes: list[str] = []
    pair_s = None
    for step in range(opts.timed_steps + 1):
        if step > 0 and budget.left() < 1.2 * pair_s + opts.reserve_s:
            notes.append(f"time budget: stopped after {step - 1} timed steps per method "
                         f"({budget.left():.0f} s left, a step pair takes {pair_s:.0f} s)")
            log("overhead: " + notes[-1])
            break
        batch = next(batches)
        order = ("grpo", "calibrl") if step % 2 == 0 else ("calibrl", "grpo")
        t_pair = time.perf_counter()
        for m in order:
            tr = trainers[m]
            if cuda:
                gc.collect()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            torch.manual_seed(step)
            clocks[m].take()
            sync(device)
            t = time.perf_counter()
            loss = tr.training_step(tr.model, batch, None)
            sync(device)
            dt = time.perf_counter() - t
            tr.model.zero_grad(set_to_none=True)
            split = step_split({**clocks[m].take(), "step": dt})
            lens = tr._metrics["train"].get("completions/mean_length") or [float("nan")]
            losses[m].append(float(loss))
            if step > 0:
                steps[m].append(split)
                lengths[m].append(lens[-1])
                if cuda:
                    peak[m].append(torch.cuda.max_memory_allocated() / 2**20)
                    step_mem[m].append((torch.cuda.max_memory_allocated() - before) / 2**20)
            log(f"overhead: step {step} {m:7} {dt:7.2f} s  (generation {split['generation']:.2f}, expert "
                f"{split['expert_forward']:.3f}, policy fwd-bwd {split['policy_fwd_bwd']:.2f})"
                + (" warm-up" if step == 0 else ""))
        pair_s = time.perf_counter() - t_pair

    result: dict = {"setting": setting, "setup_s": setup_s, "expert_logps": expert_check, "notes": notes,
                    "steps": steps, "completion_mean_length": lengths, "losses": losses}
    n = len(steps["grpo"])
    result["timed_steps_per_method"] = n
    if n == 0:
        result["ok"] = False
        return result
    med = {m: {k: statistics.median(s[k] for s in steps[m]) for k in steps[m][0]} for m in steps}
    result["median_s"] = med
    result["ratio_calibrl_over_grpo"] = med["calibrl"]["step"] / med["grpo"]["step"]
    diff = med["calibrl"]["step"] - med["grpo"]["step"]
    result["extra_s_per_step"] = diff
    result["extra_split_s"] = {k: med["calibrl"][k] - med["grpo"][k] for k in med["grpo"] if k != "step"}
    if cuda:
        result["peak_gpu_mib"] = {m: max(v) for m, v in peak.items()}
        result["step_gpu_mib"] = {m: max(v) for m, v in step_mem.items()}
    result["ok"] = bool(expert_check.get("ok")) and all(math.isfinite(x) for v in losses.values() for x in v)
    del trainers, models, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result
