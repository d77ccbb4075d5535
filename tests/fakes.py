"""Test doubles shared by several test files."""


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
