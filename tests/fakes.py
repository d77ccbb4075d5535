"""Test doubles shared by several test files, and the exit of the launched distributed workers."""

import os
import sys


class FakeVLLM:
    """Follows trl.generation.vllm_generation.VLLMGeneration's interface: generate(prompts, images,
    num_generations, profiler) -> (prompt_ids, completion_ids, logprobs[B][T][1], logprob_token_ids).
    Like vLLM server mode, it generates once per unique prompt (every num_generations-th row) with n =
    num_generations, and hands back one completion per row. Completions are deterministic functions of the
    prompt and the slot, so a test can check alignment."""

    def __init__(self, eos_id: int, token_ids: list[int]):
        self.eos_id, self.tok, self.calls, self.synced = eos_id, token_ids, [], 0

    def sync_weights(self):
        self.synced += 1

    def generate(self, prompts, images, num_generations, profiler=None):
        unique = prompts[::num_generations]
        self.calls.append((len(prompts), len(unique), num_generations))
        t = self.tok
        completion_ids = [[t[(len(p) + j) % 5], t[5 + j], self.eos_id] for p in unique for j in range(num_generations)]
        prompt_ids = [p for p in unique for _ in range(num_generations)]
        logprobs = [[[-0.5]] * len(c) for c in completion_ids]
        return prompt_ids, completion_ids, logprobs, None


def end_worker(tag: str, rank: int) -> None:
    """End a launched test worker once every rank has written its outputs: wait for all ranks, say so, and
    leave without the interpreter's teardown. That teardown races with gloo's threads and intermittently
    aborts a rank ("terminate called without an active exception", SIGABRT) after all the work is done,
    seen in CI for both the DDP and the ZeRO worker; what the tests check is written before this point."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    print(f"{tag}: rank {rank} done", flush=True)
    sys.stderr.flush()
    os._exit(0)
