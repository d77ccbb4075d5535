"""Hub model ids: fail fast, in one line, when a model name is neither a local folder nor reachable (no torch).

transformers retries an unreachable hub for about half a minute before it says anything; a typo for a local
folder (`--model mymodel`) deserves one line at once. One short request to the hub answers it; when the hub
cannot be reached, a copy in the local Hugging Face cache is used instead, without network.
"""

from __future__ import annotations

import os

PROBE_TIMEOUT_S = 10.0


def hub_model_path(model_id: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """`model_id` if the hub has it (or is reachable and lets the loader decide, e.g. a gated model), else
    the cached snapshot folder when the hub is unreachable. Raises LookupError with a one-line reason."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        cached = try_to_load_from_cache(model_id, "config.json")
    except HFValidationError:
        raise LookupError(f"model {model_id!r} is not a local folder, and not a valid hub id") from None
    cached_dir = os.path.dirname(cached) if isinstance(cached, str) else None
    if constants.HF_HUB_OFFLINE:
        if cached_dir:
            return cached_dir
        raise LookupError(f"model {model_id!r} is not a local folder, and not in the local hub cache "
                          "(HF_HUB_OFFLINE is set)")
    try:
        HfApi().model_info(model_id, timeout=timeout)
    except GatedRepoError:
        return model_id  # the loader says how to get access
    except RepositoryNotFoundError:
        raise LookupError(f"model {model_id!r} is neither a local folder nor a model on the hub (a private one "
                          "needs `hf auth login`)") from None
    except Exception as e:  # no network, DNS, proxy, timeout: the hub cannot be asked
        if cached_dir:
            return cached_dir
        raise LookupError(f"model {model_id!r} is not a local folder, and the hub cannot be reached to look "
                          f"for it ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    return model_id
