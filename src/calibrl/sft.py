"""Supervised warm start on expert solutions: a small plain-torch loop with completion-only loss.

Why not TRL's `SFTTrainer`: it does support conversational prompt-completion VLM data (TRL 1.16), but the
warm start here needs one thing it does not offer, stopping at the first checkpoint whose accuracy on a
validation set lands in a target window (a base model that is neither hopeless nor saturated, so that RL
has something to show), and on 2 CPU cores its per-step overhead is a third of the step. The loop is
short: the prompt goes through the processor exactly as GRPO tokenises it (chat template with
`add_generation_prompt=True`, images, left padding), the target is the tokenised solution plus EOS
appended after it (exactly the expert row CalibRL builds), and the loss is the mean cross-entropy over
target tokens only. AdamW, linear warm-up then a constant learning rate, gradient clipping.

Selection (`select_window=[lo, hi]`): every `select_every` steps from `select_after` on, greedy accuracy
on `n_select` rows drawn from the TRAIN split with another seed (never test data) decides: the first
checkpoint inside the window is kept; if accuracy jumps over the window between two checks, the one
nearer to it is kept. Without a window the model after `max_steps` is kept.

Single process (no accelerate / DeepSpeed): it is meant for warm starts of models that fit one device.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict

import torch

from calibrl.config import SFTArgs
from calibrl.data import load_data_file
from calibrl.errors import UsageError
from calibrl.files import is_main_process, prepare_output_dir, versions
from calibrl.models import load_model, save_tiny_model
from calibrl.multimodal import is_processor, prompt_text, row_images, tokenizer_of
from calibrl.storage import atomic_write_text
from calibrl.tasks import task_name


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------
def target_ids(processing_class, solution: str, max_length: int) -> list[int]:
    """The target tokens of one row: the solution without special tokens, truncated, then EOS."""
    tok = tokenizer_of(processing_class)
    ids = tok(solution, add_special_tokens=False)["input_ids"][: max_length - 1]
    return ids + [tok.eos_token_id]


def collate(processing_class, rows: list[dict], targets: list[list[int]]) -> dict[str, torch.Tensor]:
    """Model inputs for rows + their targets: left-padded prompts, then right-padded targets, `labels` -100
    everywhere but on target tokens (per-token multimodal fields are extended over the target with zeros)."""
    use_images = is_processor(processing_class)
    tok = tokenizer_of(processing_class)
    tok.padding_side = "left"
    texts = [prompt_text(processing_class, row, i, use_images) for i, row in enumerate(rows)]
    if use_images:
        images = [img for row in rows for img in row_images(row)]
        enc = processing_class(text=texts, images=images or None, padding=True, return_tensors="pt",
                               add_special_tokens=False)
    else:
        enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    width = max(len(t) for t in targets)
    t_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    t_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, t in enumerate(targets):
        t_ids[i, : len(t)] = torch.tensor(t)
        t_mask[i, : len(t)] = 1
    batch = dict(enc)
    batch["input_ids"] = torch.cat([enc["input_ids"], t_ids], 1)
    batch["attention_mask"] = torch.cat([enc["attention_mask"], t_mask], 1)
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in batch:
            batch[key] = torch.cat([enc[key], torch.zeros_like(t_ids)], 1)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, enc["input_ids"].shape[1]:] = torch.where(t_mask.bool(), t_ids, -100)
    batch["labels"] = labels
    return batch


def completion_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over target tokens (the model shifts labels itself)."""
    return model(**batch).loss


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def mix_wordings(rows: list[dict], mismatched: list[dict], share: float, seed: int) -> tuple[list[dict], int]:
    """`rows` with round(share * n) of them (chosen from `seed`) taking their solution from `mismatched` (the
    same problems in the mismatched wording): a warm start under which that wording is plausible to the
    policy but not its first choice. Returns (rows, how many were switched)."""
    if len(rows) != len(mismatched) or any(a["prompt"] != b["prompt"] for a, b in zip(rows, mismatched)):
        raise ValueError("the two wordings must be the same problems in the same order")
    k = round(share * len(rows))
    switched = set(random.Random(f"calibrl/mismatched_share/{seed}").sample(range(len(rows)), k))
    return [{**r, "solution": m["solution"]} if i in switched else r
            for i, (r, m) in enumerate(zip(rows, mismatched))], k


def sft_rows(args: SFTArgs) -> tuple[list[dict], list[dict], str]:
    """(training rows, validation rows, description). Rows without a solution are an error."""
    if task_name(args.dataset) is not None:
        train = args.training_rows()
        described = f"{args.expert_style} solutions"
        if args.mismatched_share > 0:
            train, k = mix_wordings(train, args.training_rows("mismatched"), args.mismatched_share, args.task_seed)
            described += f", {k} of them in the mismatched wording"
        select = []
        if args.select_window is not None:
            select = args.heldout_rows("train", args.n_select, stream="sft_select")
        return train, select, f"{args.dataset}: {len(train)} train rows, {described}"
    dataset, summary = load_data_file(args.dataset)
    rows = [dataset[i] for i in range(len(dataset))]
    missing = [i for i, r in enumerate(rows) if not isinstance(r.get(args.expert_column), str)
               or not r[args.expert_column].strip()]
    if missing:
        raise UsageError(f"{args.dataset}: row {missing[0]} has no {args.expert_column!r} to train on "
                                 f"({len(missing)} rows without one)")
    select = []
    if args.select_window is not None:
        if len(rows) <= args.n_select:
            raise UsageError(f"{args.dataset}: {len(rows)} rows, too few to hold out n_select={args.n_select}")
        rows, select = rows[: -args.n_select], rows[-args.n_select:]
    return rows, select, str(summary)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def _validation_accuracy(model, processing_class, rows: list[dict], args: SFTArgs) -> float:
    from calibrl.evaluate import evaluate

    return evaluate(model, processing_class, rows, max_new_tokens=args.select_max_new_tokens, batch_size=64)[
        "overall"]["accuracy"]


def train_sft(model, processing_class, train: list[dict], select: list[dict], args: SFTArgs,
              log_path: str | None = None) -> dict:
    """Run the loop on `model` in place; returns a summary (steps, chosen step, validation accuracies, time)."""
    from tqdm.auto import tqdm

    targets = [target_ids(processing_class, r[args.expert_column], args.max_length) for r in train]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    order_rng = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    history: list[dict] = []
    checks: list[dict] = []
    chosen_step, previous = args.max_steps, None  # previous: (step, accuracy, weights) of the last check
    window = args.select_window
    start = time.time()
    model.train()
    bar = tqdm(total=args.max_steps, desc="sft", disable=args.disable_tqdm or not is_main_process())
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    try:
        for step in range(1, args.max_steps + 1):
            lr = args.learning_rate * min(1.0, step / max(1, args.warmup_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch_idx = []
            while len(batch_idx) < args.batch_size:
                if not order:
                    order = torch.randperm(len(train), generator=order_rng).tolist()
                batch_idx.append(order.pop())
            batch = collate(processing_class, [train[i] for i in batch_idx], [targets[i] for i in batch_idx])
            batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            loss = completion_loss(model, batch)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            record = None
            if step % args.logging_steps == 0 or step == args.max_steps:
                record = {"step": step, "loss": round(loss.item(), 5), "grad_norm": round(float(grad_norm), 4),
                          "learning_rate": lr, "time_s": round(time.time() - start, 2)}
                bar.set_postfix(loss=f"{loss.item():.3f}")
            stop = False
            if window is not None and step >= args.select_after and step % args.select_every == 0:
                acc = _validation_accuracy(model, processing_class, select, args)
                checks.append({"step": step, "select_accuracy": acc})
                record = {**(record or {"step": step}), "select_accuracy": acc}
                bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{acc:.2f}")
                lo, hi = window
                if lo <= acc <= hi:
                    chosen_step, stop = step, True
                elif acc > hi:
                    chosen_step, stop = step, True
                    if previous is not None and lo - previous[1] < acc - hi:  # the earlier one is nearer
                        model.load_state_dict(previous[2])
                        chosen_step = previous[0]
                else:
                    previous = (step, acc, {k: v.detach().clone() for k, v in model.state_dict().items()})
            if record is not None:
                history.append(record)
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
            if stop:
                break
    finally:
        bar.close()
        if log:
            log.close()
    selected = next((c["select_accuracy"] for c in checks if c["step"] == chosen_step), None)
    in_window = selected is not None and window is not None and window[0] <= selected <= window[1]
    return {"steps_run": step, "chosen_step": chosen_step, "select_accuracy": selected, "in_window": in_window,
            "checks": checks, "seconds": round(time.time() - start, 2), "final_loss": history[-1].get("loss")
            if history else None}


def run_sft(args: SFTArgs, out_dir: str | None = None, quiet: bool = False) -> dict:
    """Build the model and data from `args`, train, save the model (and `sft.json`) into `out_dir`."""
    out_dir = out_dir or args.output_dir or os.path.join("runs", "sft")
    prepare_output_dir(out_dir, args.overwrite)
    train, select, description = sft_rows(args)
    if not quiet:
        print(f"calibrl sft: {description}; model {args.model}", flush=True)
    torch.manual_seed(args.seed)
    model, processing_class = load_model(args.model, seed=args.seed)
    summary = train_sft(model, processing_class, train, select, args, log_path=os.path.join(out_dir, "sft_log.jsonl"))
    save_tiny_model(model, processing_class, out_dir)
    info = {"args": asdict(args), "summary": summary, "versions": versions()}
    atomic_write_text(os.path.join(out_dir, "sft.json"), json.dumps(info, indent=2, default=str))
    return {**summary, "output_dir": out_dir}


def summary_table(summary: dict) -> str:
    """A few aligned lines describing a finished warm start."""
    acc = summary.get("select_accuracy")
    rows = [
        ("steps run", str(summary["steps_run"])),
        ("model kept (step)", str(summary["chosen_step"])),
        ("validation accuracy", "-" if acc is None else f"{100 * acc:.1f}%"
         + ("" if summary.get("in_window") or acc is None else " (outside the window)")),
        ("final loss", "-" if summary.get("final_loss") is None else f"{summary['final_loss']:.4f}"),
        ("time", f"{summary['seconds']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


__all__ = ["SFTArgs", "collate", "completion_loss", "run_sft", "sft_rows", "summary_table", "target_ids",
           "train_sft"]
