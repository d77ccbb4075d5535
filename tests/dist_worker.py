"""Worker for tests/test_distributed.py, launched with torchrun (gloo on CPU). Not collected by pytest.

Trains `calibrl` for 2 steps on a fixed global batch with a deterministic vLLM-like backend (so the rollouts
do not depend on how rows are split over processes) and records, per row, what the expert path computed.
    torchrun --nproc_per_node N tests/dist_worker.py MODEL_DIR OUT_DIR
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from calibrl import CalibRLConfig, CalibRLTrainer, prefix  # noqa: E402
from calibrl.models import load_tiny_model  # noqa: E402
from helpers import digit_rows, hash_accuracy, hash_format  # noqa: E402
from fakes import FakeVLLM, end_worker  # noqa: E402


class Recording(CalibRLTrainer):
    records: list

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        G = self.num_generations
        for i, x in enumerate(inputs):
            n = int(out["expert_mask"][i].sum())
            self.records.append({
                "step": self.state.global_step, "uid": x["uid"], "slot": i % G,
                "advantage": out["advantages"][i].item(), "sign": out["pass_sign"][i].item(),
                "expert_logp_sum": out["expert_logps"][i, :n].sum().item(), "expert_len": n,
                "completion": out["completion_ids"][i][out["completion_mask"][i].bool()].tolist(),
                "group_uids": sorted({inputs[(i // G) * G + j]["uid"] for j in range(G)}),
            })
        return out


def main(model_dir: str, out_dir: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    rows = digit_rows(8)
    for k, r in enumerate(rows):
        r["uid"] = k
    model, proc = load_tiny_model(model_dir)
    cfg = CalibRLConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1,
        seed=0, disable_tqdm=True, max_steps=2, learning_rate=5e-3, num_generations=4,
        per_device_train_batch_size=16 // world, max_completion_length=64, reward_weights=[1.0, 0.1],
        gap="token", ddp_find_unused_parameters=True, shared_prefix=os.environ.get("SHARED_PREFIX", "1") == "1",
    )
    tr = Recording(model=model, reward_funcs=[hash_accuracy, hash_format], args=cfg,
                   train_dataset=Dataset.from_list(rows), processing_class=proc)
    tr.records = []
    digits = proc.tokenizer.convert_tokens_to_ids(list("0123456789"))
    tr.use_vllm, tr.vllm_generation, tr._last_loaded_step = True, FakeVLLM(tr.eos_token_ids[0], digits), -1
    tr.vllm_importance_sampling_correction = False
    shared_calls = []  # forwards that took the shared-prefix layout (calibrl.prefix)
    real = prefix.shared_logps_and_entropies
    prefix.shared_logps_and_entropies = lambda *a, **k: shared_calls.append(1) or real(*a, **k)
    tr.train()
    with open(os.path.join(out_dir, f"records-{rank}.json"), "w") as f:
        json.dump(tr.records, f)
    with open(os.path.join(out_dir, f"shared-{rank}.json"), "w") as f:
        json.dump(len(shared_calls), f)
    if rank == 0:
        logs = [h for h in tr.state.log_history if "loss" in h]
        torch.save({n: p.detach().cpu() for n, p in tr.accelerator.unwrap_model(tr.model).named_parameters()},
                   os.path.join(out_dir, "params.pt"))
        with open(os.path.join(out_dir, "logs.json"), "w") as f:
            json.dump(logs, f)
    end_worker("dist_worker", rank)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
