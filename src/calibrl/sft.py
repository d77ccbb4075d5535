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
import time
from dataclasses import asdict, dataclass, field

import torch

from calibrl import recipes


@dataclass
class SFTArgs:
    """Fields of `calibrl sft` (YAML keys or `--key value`)."""

    model: str = field(default="tiny:qwen2_5_vl:small", metadata={"help": "Model directory or tiny:<family>:<size>."})
    dataset: str = field(default="task:digits", metadata={"help": "task:<name> or a data file with `solution`."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the model is saved (default runs/sft)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})
    n_train: int = field(default=4096, metadata={"help": "Rows generated for a task: dataset."})
    task_seed: int = field(default=0, metadata={"help": "Seed of the generated task rows."})
    expert_style: str = field(default="native", metadata={"help": "Expert style of a task: dataset."})
    noise_rate: float = field(default=0.3, metadata={"help": "Share of wrong experts with expert_style=noisy."})
    difficulty: list[int] | None = field(default=None, metadata={"help": "Difficulty levels of a task: dataset."})
    task_types: list[str] | None = field(default=None, metadata={"help": "Problem types kept (e.g. digits/sum)."})
    expert_column: str = field(default="solution", metadata={"help": "Column holding the target solution."})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps (upper bound with select_window)."})
    batch_size: int = field(default=32, metadata={"help": "Rows per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (constant after warm-up)."})
    warmup_steps: int = field(default=30, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    max_length: int = field(default=128, metadata={"help": "Target tokens kept per row, EOS included."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order and the model build."})
    logging_steps: int = field(default=10, metadata={"help": "Log the loss every N steps."})
    select_window: list[float] | None = field(default=None, metadata={"help": "[lo, hi]: stop at the first "
                                              "checkpoint whose validation accuracy is in the window."})
    select_every: int = field(default=10, metadata={"help": "Steps between validation checks."})
    select_after: int = field(default=0, metadata={"help": "First step at which to check."})
    n_select: int = field(default=128, metadata={"help": "Validation rows (train split, another seed; for a "
                          "file, the last rows are held out of training)."})
    select_max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per validation answer."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})

    def __post_init__(self):
        if self.max_steps < 1 or self.batch_size < 1 or self.select_every < 1 or self.max_length < 2:
            raise ValueError("max_steps, batch_size and select_every must be >= 1 and max_length >= 2")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.select_window is not None:
            lo_hi = list(self.select_window)
            if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0:
                raise ValueError(f"select_window must be [lo, hi] with 0 <= lo <= hi <= 1, got {lo_hi}")


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------
def _tokenizer(processing_class):
    return getattr(processing_class, "tokenizer", processing_class)


def target_ids(processing_class, solution: str, max_length: int) -> list[int]:
    """The target tokens of one row: the solution without special tokens, truncated, then EOS."""
    tok = _tokenizer(processing_class)
    ids = tok(solution, add_special_tokens=False)["input_ids"][: max_length - 1]
    return ids + [tok.eos_token_id]


def collate(processing_class, rows: list[dict], targets: list[list[int]]) -> dict[str, torch.Tensor]:
    """Model inputs for rows + their targets: left-padded prompts, then right-padded targets, `labels` -100
    everywhere but on target tokens (per-token multimodal fields are extended over the target with zeros)."""
    from calibrl.evaluate import _is_processor, _prompt_text, _row_images

    use_images = _is_processor(processing_class)
    tok = _tokenizer(processing_class)
    tok.padding_side = "left"
    texts = [_prompt_text(processing_class, row, i, use_images) for i, row in enumerate(rows)]
    if use_images:
        images = [img for row in rows for img in _row_images(row)]
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
def sft_rows(args: SFTArgs) -> tuple[list[dict], list[dict], str]:
    """(training rows, validation rows, description). Rows without a solution are an error."""
    if recipes.task_name(args.dataset) is not None:
        train = recipes.task_rows(args.dataset, "train", args.n_train, args.task_seed, args.expert_style,
                                  args.noise_rate, args.difficulty, args.task_types)
        select = []
        if args.select_window is not None:
            select = recipes.task_rows(args.dataset, "train", args.n_select, args.task_seed + 1, "native", 0.0,
                                       args.difficulty, args.task_types)
        return train, select, f"{args.dataset}: {len(train)} train rows, {args.expert_style} solutions"
    dataset, summary = recipes.load_data_file(args.dataset)
    rows = recipes.dataset_rows(dataset)
    missing = [i for i, r in enumerate(rows) if not isinstance(r.get(args.expert_column), str)
               or not r[args.expert_column].strip()]
    if missing:
        raise recipes.UsageError(f"{args.dataset}: row {missing[0]} has no {args.expert_column!r} to train on "
                                 f"({len(missing)} rows without one)")
    select = []
    if args.select_window is not None:
        if len(rows) <= args.n_select:
            raise recipes.UsageError(f"{args.dataset}: {len(rows)} rows, too few to hold out n_select={args.n_select}")
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
    bar = tqdm(total=args.max_steps, desc="sft", disable=args.disable_tqdm or not recipes.is_main_process())
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
    from calibrl.models import save_tiny_model

    out_dir = out_dir or args.output_dir or os.path.join("runs", "sft")
    recipes.prepare_output_dir(out_dir, args.overwrite)
    train, select, description = sft_rows(args)
    if not quiet:
        print(f"calibrl sft: {description}; model {args.model}", flush=True)
    torch.manual_seed(args.seed)
    model, processing_class = recipes.load_model(args.model, seed=args.seed)
    summary = train_sft(model, processing_class, train, select, args, log_path=os.path.join(out_dir, "sft_log.jsonl"))
    save_tiny_model(model, processing_class, out_dir)
    info = {"args": asdict(args), "summary": summary, "versions": recipes.versions()}
    with open(os.path.join(out_dir, "sft.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, default=str)
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
