"""Shared-prefix policy forward: each prompt (and its images) runs once, its G completions attend to it.

GRPO scores G completions of one prompt. TRL's repeated layout runs B = n·G rows [prompt | completion], so a
prompt, its image tokens and the vision tower run G times, forward and backward. Here the rows that share a
prompt are packed into one sequence (the prefix-grouping idea of arXiv 2506.05433; our own code):

    [ p_1 … p_{P-1} | p_P c¹_1 … c¹_{n_1} | p_P c²_1 … c²_{n_2} | … ]
      shared prefix   block 1              block 2

with a 4-D block mask: a token of block k sees the shared prefix and the earlier tokens of block k, never
another block (causal attention within each). The last prompt token p_P heads every block: its hidden state
predicts c^k_1, and one position carries one label, so it is repeated (one token per completion). Every token
keeps the position id the repeated layout gives it, computed by the model's own rule (the column index for
text models, Qwen2.5-VL's 3-D rope index) on the repeated layout and gathered. So each completion token sees
the same keys, values and positions as in the repeated layout: its log-prob and entropy are equal, and so are
the gradients (the prefix's gradient is the sum over the blocks, as it is the sum over the G copies).

Attention. With sdpa, each layer runs two attentions instead of one over the packed sequence (a dense N×N mask
would spend most of its work on block pairs that never see each other): the shared prefix, causally, and
every block against [its prefix; itself] — S·P² + (blocks)·(T+1)·(P+T+1) scores instead of S·N². The layout
reaches the attention on the 4-D `attention_mask` the model passes through unchanged (an empty marker tensor
that carries it), and our sdpa entry (`install_attention`) runs it; anything else given the marker fails on
its shape, loudly. Eager attention gets the dense additive mask.

Shapes (the repeated layout, as TRL's `_get_per_token_logps_and_entropies` takes it):
    input_ids, attention_mask   (B, L), L = P + T: P prompt columns (left-padded), T = logits_to_keep
                                completion columns (right-padded)
    returned log-probs, entropy (B, T), 0 where the completion is padding (as TRL's fused head gives)
Packed: S sequences (one per distinct prompt in a chunk), each padded to N positions.

What it runs on: the model as TRL patched it (`trl.trainer.utils.add_fused_lm_head`), called with
pre-shifted labels (`shift_labels`), so the log-probs and entropies come from the very kernel TRL uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "FAMILIES",
    "core_model",
    "unsupported_reason",
    "layout_reason",
    "prompt_groups",
    "repeated_position_ids",
    "pack",
    "block_mask",
    "PrefixAttention",
    "install_attention",
    "shared_logps_and_entropies",
]

# model_type -> how its positions are made: "column" (text models: the column index, arange over the padded row)
# or "mrope" (Qwen2.5-VL: the model's own 3-D rope index). LLaVA's language model must be a "column" model.
FAMILIES = {"qwen2": "column", "llama": "column", "llava": "column", "qwen2_5_vl": "mrope"}
ATTENTION = ("sdpa", "eager")  # sdpa: our two-pass entry; eager: a dense 4-D mask; flash kernels take no mask
UNSUPPORTED_FIELDS = ("pixel_attention_mask", "spatial_shapes", "num_tiles", "image_position_ids")
_PAD_BLOCK = 1 << 30  # block ids of padding positions start here: each sees only itself


def core_model(model):
    """The transformers model inside DDP / DeepSpeed (`.module`) and PEFT (`get_base_model`) wrappers."""
    from transformers import PretrainedConfig

    m = model
    # a DeepSpeed engine has a `config` of its own (a dict): unwrap until the config is a model's
    while hasattr(m, "module") and not isinstance(getattr(m, "config", None), PretrainedConfig):
        m = m.module
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


def _is_fused(m) -> bool:
    """True when TRL's `add_fused_lm_head` patched this model's forward (an instance-level `_fused_forward`)."""
    fwd = m.__dict__.get("forward")
    return getattr(getattr(getattr(fwd, "__func__", None), "__code__", None), "co_name", None) == "_fused_forward"


def unsupported_reason(model) -> str | None:
    """Why this model cannot use the shared-prefix forward, or None when it can. Static: the model alone."""
    m = core_model(model)
    cfg = getattr(m, "config", None)
    if cfg is None:
        return f"{type(m).__name__} is not a transformers model"
    kind = cfg.model_type
    text = cfg.get_text_config()
    if kind not in FAMILIES:
        return f"model_type {kind!r} is not one it knows ({', '.join(FAMILIES)})"
    if kind == "llava" and FAMILIES.get(text.model_type) != "column":
        return f"LLaVA's language model {text.model_type!r} is not one it knows"
    impl = getattr(text, "_attn_implementation", None)
    if impl not in ATTENTION:
        return f"attention implementation {impl!r} ignores a 4-D block mask (sdpa or eager read it)"
    if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
        return "sliding-window attention counts positions in the packed sequence"
    if not _is_fused(m):
        return "the model's forward is not TRL's fused LM head (add_fused_lm_head)"
    return None


def _special_ids(m) -> set[int]:
    cfg = core_model(m).config
    names = ("image_token_id", "image_token_index", "video_token_id")
    return {v for v in (getattr(cfg, n, None) for n in names) if isinstance(v, int)}


def layout_reason(model, input_ids, attention_mask, logits_to_keep, compute_aux_loss=False, **mm) -> str | None:
    """Why this batch cannot use the shared-prefix forward, or None when it can. Per call: the batch's layout."""
    if compute_aux_loss:
        return "the MoE load-balancing loss depends on which tokens are run"
    for k in UNSUPPORTED_FIELDS:
        if mm.get(k) is not None:
            return f"multimodal field {k!r} is not one it knows"
    pv = mm.get("pixel_values")
    if pv is not None and mm.get("num_images") is None:
        return "pixel_values without num_images"
    if pv is not None and mm.get("image_grid_thw") is None and pv.size(0) != sum(mm["num_images"]):
        return "pixel_values are neither per patch (image_grid_thw) nor per image"
    if attention_mask.dim() != 2:
        return "the attention mask is not (B, L)"
    P = input_ids.size(1) - logits_to_keep
    if P < 1:
        return "no prompt columns"
    pm, cm = attention_mask[:, :P].long(), attention_mask[:, P:].long()
    if (pm.diff(dim=1) < 0).any() or (pm[:, -1] == 0).any():  # zeros then ones, at least one real token
        return "prompts are not left-padded"
    if (cm.diff(dim=1) > 0).any():  # ones then zeros
        return "completions are not right-padded"
    if cm.sum() == 0:
        return "every completion is empty"
    if torch.isin(input_ids[:, P - 1], torch.tensor(sorted(_special_ids(model)), device=input_ids.device,
                                                          dtype=input_ids.dtype)).any():
        return "a prompt ends with an image token (it is repeated at the head of each block)"
    for k in ("mm_token_type_ids", "token_type_ids"):  # an image in a completion (tool images)
        if mm.get(k) is not None and (mm[k][:, P - 1:] != 0).any():
            return f"{k} marks an image in a completion"
    return None


# ----------------------------------------------------------------------------------------------------------
# Which rows share a prompt
# ----------------------------------------------------------------------------------------------------------
def _image_spans(pixel_values, image_grid_thw, num_images) -> tuple[list[range], list[tuple[int, int]]]:
    """Per row, its images (indices); per image, its rows of `pixel_values` [lo, hi)."""
    cum = [0]
    for n in num_images:
        cum.append(cum[-1] + n)
    rows_of_image = [range(cum[i], cum[i + 1]) for i in range(len(num_images))]
    if image_grid_thw is not None:  # Qwen-style: one row of pixel_values per patch
        sizes = image_grid_thw.prod(dim=-1).tolist()
    elif pixel_values.size(0) == cum[-1]:  # one entry per image (LLaVA)
        sizes = [1] * cum[-1]
    else:
        raise ValueError("pixel_values match neither image_grid_thw nor num_images")
    spans, lo = [], 0
    for s in sizes:
        spans.append((lo, lo + int(s)))
        lo += int(s)
    return rows_of_image, spans


def prompt_groups(input_ids, attention_mask, logits_to_keep, pixel_values=None, image_grid_thw=None,
                  num_images=None) -> list[list[int]]:
    """Rows of the batch grouped by identical prompt: the same prompt tokens and the same images (pixel for
    pixel). Groups in order of their first row; rows in order within a group. Rows need not be contiguous
    (TRL shuffles a generation batch before splitting it into micro-batches)."""
    P = input_ids.size(1) - logits_to_keep
    pm = attention_mask[:, :P].bool()
    images = None
    if pixel_values is not None:
        rows_of_image, spans = _image_spans(pixel_values, image_grid_thw, num_images)
        images = [[pixel_values[spans[i][0]:spans[i][1]] for i in rows_of_image[r]] for r in range(len(num_images))]

    def same_images(a: int, b: int) -> bool:
        return images is None or (len(images[a]) == len(images[b])
                                  and all(torch.equal(x, y) for x, y in zip(images[a], images[b])))

    groups: list[list[int]] = []
    buckets: dict[tuple, list[int]] = {}  # prompt tokens (+ image shapes) -> indices into groups
    for r in range(input_ids.size(0)):
        key = tuple(input_ids[r, :P][pm[r]].tolist())
        if images is not None:
            key += tuple(tuple(x.shape) for x in images[r])
        for gi in buckets.setdefault(key, []):
            if same_images(groups[gi][0], r):
                groups[gi].append(r)
                break
        else:
            buckets[key].append(len(groups))
            groups.append([r])
    return groups


# ----------------------------------------------------------------------------------------------------------
# Positions, packing, mask
# ----------------------------------------------------------------------------------------------------------
def repeated_position_ids(model, input_ids, attention_mask, image_grid_thw=None, mm_token_type_ids=None):
    """(R, B, L) position ids the model itself gives the repeated layout: R = 3 for Qwen2.5-VL (its rope index,
    through the model's own `compute_3d_position_ids`, which the model's forward calls the same way), else
    R = 1 (the column index, as text models do when no position ids are passed)."""
    m = core_model(model)
    B, L = input_ids.shape
    if FAMILIES[m.config.model_type] == "mrope":
        pos = m.base_model.compute_3d_position_ids(
            input_ids=input_ids, image_grid_thw=image_grid_thw, video_grid_thw=None, inputs_embeds=None,
            attention_mask=attention_mask, cache=None, mm_token_type_ids=mm_token_type_ids,
        )
        if pos is not None:
            return pos
        return torch.arange(L, device=input_ids.device).view(1, 1, L).expand(3, B, L)  # text-only batch
    return torch.arange(L, device=input_ids.device).view(1, 1, L).expand(1, B, L)


@dataclass
class Packing:
    """Where each packed position comes from, and where its log-prob goes.

    src_row, src_col: (S, N) the repeated layout's (row, column) each packed position copies
    block:            (S, N) -1 on the shared prefix, k on completion block k, ≥ _PAD_BLOCK on padding
    labelled:         (S, N) bool, positions that predict a completion token
    out_row, out_col: (M,) for the labelled positions in row-major order, the (row, completion column) of
                      the token they predict
    n_shared:         per sequence, the length of its shared prefix (it starts the sequence)
    blocks:           per block, (sequence, first position, length)
    """

    src_row: torch.Tensor
    src_col: torch.Tensor
    block: torch.Tensor
    labelled: torch.Tensor
    out_row: torch.Tensor
    out_col: torch.Tensor
    n_shared: list[int]
    blocks: list[tuple[int, int, int]]


def pack(groups: list[list[int]], attention_mask, logits_to_keep) -> Packing:
    """One packed sequence per group: the shared prompt (its real tokens but the last), then per member a
    block [p_P, its real completion tokens]. Completion padding is dropped (nothing real attends to it)."""
    dev = attention_mask.device
    P = attention_mask.size(1) - logits_to_keep
    prompt_len = attention_mask[:, :P].sum(1).tolist()
    comp_len = attention_mask[:, P:].sum(1).tolist()
    seqs, n_shareds, blocks = [], [], []
    for s, rows in enumerate(groups):
        r0 = rows[0]
        rr, cc, bb, ll = [], [], [], []
        start = P - int(prompt_len[r0])
        n_shared = P - 1 - start
        n_shareds.append(n_shared)
        at = n_shared
        rr.append(torch.full((n_shared,), r0)), cc.append(torch.arange(start, P - 1))
        bb.append(torch.full((n_shared,), -1)), ll.append(torch.zeros(n_shared, dtype=torch.bool))
        for k, r in enumerate(rows):
            n = int(comp_len[r])
            if n == 0:
                continue  # an all-masked completion: no label, nothing to run
            rr.append(torch.full((n + 1,), r)), cc.append(torch.arange(P - 1, P + n))
            bb.append(torch.full((n + 1,), k))
            blocks.append((s, at, n + 1))
            at += n + 1
            ll.append(torch.arange(n + 1) < n)  # p_P .. c_{n-1} predict c_1 .. c_n; the last token predicts nothing
        seqs.append((r0, torch.cat(rr), torch.cat(cc), torch.cat(bb), torch.cat(ll)))
    N = max(len(s[1]) for s in seqs)
    S = len(seqs)
    src_row = torch.empty(S, N, dtype=torch.long)
    src_col = torch.full((S, N), P - 1, dtype=torch.long)  # padding copies p_P: never an image token
    block = _PAD_BLOCK + torch.arange(N).repeat(S, 1)
    labelled = torch.zeros(S, N, dtype=torch.bool)
    for s, (r0, rr, cc, bb, ll) in enumerate(seqs):
        n = len(rr)
        src_row[s] = r0
        src_row[s, :n], src_col[s, :n], block[s, :n], labelled[s, :n] = rr, cc, bb, ll
    src_row, src_col, block, labelled = (t.to(dev) for t in (src_row, src_col, block, labelled))
    return Packing(src_row, src_col, block, labelled, src_row[labelled], src_col[labelled] + 1 - P, n_shareds, blocks)


def block_mask(block: torch.Tensor) -> torch.Tensor:
    """(S, 1, N, N) bool, True where query i may attend key j: j ≤ i, and key j is on the shared prefix or in
    query i's own block. Every query sees at least itself (no all-masked row, so no NaN)."""
    N = block.size(1)
    i = torch.arange(N, device=block.device)
    causal = i.view(1, N, 1) >= i.view(1, 1, N)
    key, query = block.unsqueeze(1), block.unsqueeze(2)
    return (causal & ((key == -1) | (key == query))).unsqueeze(1)


class PrefixAttention:
    """The two attentions of one packed batch, for every layer (the indices are computed once per forward).

    Prefix pass: positions [0, Pm) of every sequence, causal (rows past a sequence's own prefix are blocks or
    padding there; their output is not used). Block pass: R blocks of up to Tb positions, each against the Pm
    prefix keys of its sequence (those past its prefix masked) and its own keys, causally.
    src (S, N) picks each position's output from [prefix outputs (S·Pm); block outputs (R·Tb); a zero row].
    """

    def __init__(self, pk: Packing):
        dev = pk.block.device
        S, N = pk.block.shape
        self.calls = 0
        self.Pm = Pm = max(pk.n_shared)
        R, Tb = len(pk.blocks), max(n for _, _, n in pk.blocks)
        t = torch.arange(Tb)
        self.blk_seq = torch.tensor([s for s, _, _ in pk.blocks])
        starts = torch.tensor([a for _, a, _ in pk.blocks])
        lens = torch.tensor([n for _, _, n in pk.blocks])
        self.blk_pos = starts[:, None] + torch.minimum(t[None], lens[:, None] - 1)  # padding repeats the last
        n_shared = torch.tensor(pk.n_shared)[self.blk_seq]
        see_prefix = torch.arange(Pm)[None, None, :] < n_shared[:, None, None]  # (R, 1, Pm)
        see_block = (t[None, :, None] >= t[None, None, :]).expand(R, Tb, Tb)  # causal within the block
        self.blk_mask = torch.cat([see_prefix.expand(R, Tb, Pm), see_block], dim=2).unsqueeze(1)
        src = torch.full((S, N), S * Pm + R * Tb, dtype=torch.long)  # the zero row (padding)
        for s, n in enumerate(pk.n_shared):
            src[s, :n] = s * Pm + torch.arange(n)
        for r, (s, a, n) in enumerate(pk.blocks):
            src[s, a:a + n] = S * Pm + r * Tb + torch.arange(n)
        self.blk_seq, self.blk_pos, self.blk_mask, self.src = (
            x.to(dev) for x in (self.blk_seq, self.blk_pos, self.blk_mask, src))
        self.marker = torch.empty(S, 1, N, 0, dtype=torch.bool, device=dev)  # no attention can use it as a mask
        self.marker._calibrl_prefix = self

    def attend(self, q, k, v, scaling=None, dropout=0.0):
        """q (S, H, N, d), k and v (S, H_kv, N, d) -> (S, N, H, d), the layout attention functions return."""
        S, H, N, d = q.shape
        if k.size(1) != H:  # grouped-query attention: repeat the kv heads, as transformers' repeat_kv
            k, v = (x.repeat_interleave(H // x.size(1), dim=1) for x in (k, v))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        pieces = []
        Pm = self.Pm
        if Pm:
            o = sdpa(q[:, :, :Pm], k[:, :, :Pm], v[:, :, :Pm], dropout_p=dropout, scale=scaling, is_causal=True)
            pieces.append(o.transpose(1, 2).reshape(S * Pm, H, d))
        seq, pos = self.blk_seq[:, None], self.blk_pos
        qb, kb, vb = (x[seq, :, pos].transpose(1, 2) for x in (q, k, v))  # (R, H, Tb, d)
        kp, vp = (x[self.blk_seq, :, :Pm] for x in (k, v))  # (R, H, Pm, d): each block's own prefix
        o = sdpa(qb, torch.cat([kp, kb], 2), torch.cat([vp, vb], 2), attn_mask=self.blk_mask, dropout_p=dropout,
                 scale=scaling)
        pieces.append(o.transpose(1, 2).reshape(-1, H, d))
        pieces.append(q.new_zeros(1, H, d))
        return torch.cat(pieces)[self.src]


_INSTALLED: dict = {}


def install_attention() -> None:
    """Put our entry in front of transformers' "sdpa" attention (once per process): a call whose mask is a
    `PrefixAttention` marker runs the two-pass attention; every other call goes to the sdpa it replaced."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ALL_ATTENTION_FUNCTIONS["sdpa"] is _INSTALLED.get("entry"):
        return
    inner = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def sdpa_or_prefix(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layout = getattr(attention_mask, "_calibrl_prefix", None)
        if layout is None:
            return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        layout.calls += 1
        return layout.attend(query, key, value, scaling=scaling, dropout=dropout), None

    _INSTALLED["entry"] = sdpa_or_prefix
    ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_or_prefix


def _attention_mask(model, pk: Packing):
    """What the model gets as `attention_mask`: the sdpa marker (two-pass attention), or for eager the dense
    block mask, additive, in the embeddings' dtype (eager adds the mask to the scores)."""
    m = core_model(model)
    if m.config.get_text_config()._attn_implementation == "sdpa":
        install_attention()
        return PrefixAttention(pk).marker
    allowed = block_mask(pk.block)
    dtype = m.get_input_embeddings().weight.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------------------
# The forward
# ----------------------------------------------------------------------------------------------------------
def _chunks(groups: list[list[int]], max_rows: int | None) -> list[list[list[int]]]:
    """Whole groups per chunk, at most `max_rows` rows each (a larger group alone), as TRL's batch_size caps
    a forward's rows to bound memory."""
    if not max_rows:
        return [groups]
    out, cur, n = [], [], 0
    for g in groups:
        if cur and n + len(g) > max_rows:
            out.append(cur)
            cur, n = [], 0
        cur.append(g)
        n += len(g)
    return out + [cur]


def shared_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, groups=None, batch_size=None,
                               pixel_values=None, image_grid_thw=None, num_images=None, image_sizes=None,
                               token_type_ids=None, mm_token_type_ids=None, **unused):
    """Per-token log-probs and entropies (B, T) of the completions, as TRL's `_get_per_token_logps_and_entropies`
    returns them for the repeated layout, from forwards in the shared-prefix layout. `model` is TRL's fused-head
    model; call `layout_reason` and `unsupported_reason` first. Entropy is None when the head does not compute it."""
    B, L = input_ids.shape
    T = logits_to_keep
    if groups is None:
        groups = prompt_groups(input_ids, attention_mask, T, pixel_values, image_grid_thw, num_images)
    pos = repeated_position_ids(model, input_ids, attention_mask, image_grid_thw, mm_token_type_ids)
    if pixel_values is not None:
        rows_of_image, spans = _image_spans(pixel_values, image_grid_thw, num_images)
    logps = torch.zeros(B, T, device=input_ids.device)
    entropies = None
    for chunk in _chunks(groups, batch_size):
        pk = pack(chunk, attention_mask, T)
        if not pk.blocks:  # every completion of the chunk is empty: nothing to score (its rows stay 0)
            continue
        ids = input_ids[pk.src_row, pk.src_col]
        labels = input_ids[pk.src_row, (pk.src_col + 1).clamp(max=L - 1)].masked_fill(~pk.labelled, -100)
        p = pos[:, pk.src_row, pk.src_col]
        kwargs = {"position_ids": p if p.size(0) > 1 else p[0]}
        for k, v in (("token_type_ids", token_type_ids), ("mm_token_type_ids", mm_token_type_ids)):
            if v is not None:
                kwargs[k] = v[pk.src_row, pk.src_col]
        if pixel_values is not None:  # the images of each group's first row, in packed order
            imgs = [i for g in chunk for i in rows_of_image[g[0]]]
            kwargs["pixel_values"] = torch.cat([pixel_values[spans[i][0]:spans[i][1]] for i in imgs]) \
                if imgs else pixel_values[:0]
            if image_grid_thw is not None:
                kwargs["image_grid_thw"] = image_grid_thw[imgs]
            if image_sizes is not None:
                kwargs["image_sizes"] = image_sizes[imgs]
            if not imgs:  # no image in this chunk: run it as text
                kwargs.pop("pixel_values"), kwargs.pop("image_grid_thw", None), kwargs.pop("image_sizes", None)
        mask = _attention_mask(model, pk)
        out = model(input_ids=ids, attention_mask=mask, shift_labels=labels, fused_lm_head=True, **kwargs)
        layout = getattr(mask, "_calibrl_prefix", None)
        if layout is not None and layout.calls < core_model(model).config.get_text_config().num_hidden_layers:
            raise RuntimeError("shared prefix: the layers' attention did not go through calibrl.prefix's sdpa entry")
        # Scatter the labelled positions back to the repeated layout's (row, completion column).
        logps = logps.to(out.log_probs.dtype).index_put((pk.out_row, pk.out_col), out.log_probs[pk.labelled])
        if out.entropy is not None:
            if entropies is None:
                entropies = torch.zeros(B, T, device=input_ids.device, dtype=out.entropy.dtype)
            entropies = entropies.index_put((pk.out_row, pk.out_col), out.entropy[pk.labelled])
    return logps, entropies
