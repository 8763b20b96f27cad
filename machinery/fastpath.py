"""CUDA fast path — speed only, the same functions: LoRA in fewer kernels, fused RMSNorm, rotary in the token layout,
no cuDNN attention, one-query decode attention by matmuls, CUDA graphs for decoding and for the training step. Taken
on CUDA when cfg.cuda_speedups is on (the default; --no-cuda-speedups turns it off); the CPU never takes it, so CPU
runs stay byte-reproducible. The script enters it through `cuda_fast_path` (a run), `static_decoder` (generation)
and `training_steps` (training)."""
from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

import torch

from machinery import log
from machinery.models import (contiguous_lm_head, input_device, model_devices, position_ids, prompt_positions,
                              text_config, unwrap)


__all__ = [  # the declared surface: what the script, the studies, the benchmark and paper/tables.py use
    "StaticDecoder", "cuda_fast_path", "fast_path_on", "static_decoder", "training_steps",
]


def fast_path_on(model, cfg) -> bool:
    """The one switch: the CUDA fast path runs for a model on a CUDA device unless cfg.cuda_speedups is off or the
    model spans several devices (split_fallback, logged once)."""
    if not (cfg.cuda_speedups and input_device(model).type == "cuda"):
        return False
    reason = split_fallback(model_devices(model))
    if reason:
        log_once(reason)
    return reason is None


def split_fallback(devices: list[str]) -> str | None:
    """Why a model on `devices` (model_devices) leaves the CUDA fast path, or None for one device: the graphed
    training step, the StaticDecoder's graph and static cache, and the fused kernels are built for one device, so a
    split model (several GPUs, or a GPU and CPU offload) trains eagerly and generates with transformers' generate."""
    if len(devices) < 2:
        return None
    return (f"the model spans {len(devices)} devices ({', '.join(devices)}): CUDA fast path off, eager training and "
            "transformers' generate")


def sliding_window_below(model, cache_len: int) -> int | None:
    """The attention window of a model whose sliding-window layers see fewer than `cache_len` tokens (Mistral,
    Gemma-3 with short windows), else None. StaticCache gives such layers a ring buffer of the window's size, which
    the StaticDecoder's full-length attention mask does not fit."""
    config = text_config(model)
    window, types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    sliding = window is not None and (types is None or "sliding_attention" in types)
    return window if sliding and window < cache_len else None

_FALLBACKS_LOGGED: set[str] = set()


def log_once(message: str) -> None:
    """Log a fallback (an architecture or placement that leaves the fast path) the first time it is taken."""
    if message not in _FALLBACKS_LOGGED:
        _FALLBACKS_LOGGED.add(message)
        log.info("%s", message)


def static_decoder(model, tok, cfg, rows: int, cache_len: int, inject=None) -> StaticDecoder | None:
    """A StaticDecoder for batches of up to `rows` x `cache_len` tokens (prompt + answer), or None where the
    architecture is not supported by it (said once in the log): the caller then uses transformers' generate.
    `inject(vectors, alphas, prompt_end, row_start)` is the injection's context manager (None: no injection at all)."""
    window = sliding_window_below(model, cache_len)
    if window is None:
        return StaticDecoder(model, tok, rows, cache_len, inject, cfg.control_temperature)
    log_once(f"{type(unwrap(model)).__name__}: sliding-window attention of {window} tokens is shorter than the "
             f"{cache_len}-token static cache; generating with transformers' generate (eager) instead of the "
             "StaticDecoder and its CUDA graph")
    return None


@contextmanager
def cuda_fast_path(model, cfg):
    """For the duration of a run, on the CUDA fast path: LoRA layers through LoraDelta (any model), and for a
    Llama-architecture model fused RMSNorm kernels on this model, Llama's rotary embedding in the token layout, decode
    steps' attention by matmuls (one_query_attention), and scaled-dot-product attention without the cuDNN backend
    (torch's first choice on Hopper), which compiles a kernel for each new batch shape (0.1-2 s each, ~10 s per run);
    flash attention (causal training) and memory-efficient attention (padded prefill, decode) need no compilation and
    were as fast. Everything is restored on exit, also after an exception. Yields what it did, for metrics.json
    (off the fast path nothing, or why a split model left it; the CUDA graphs of decoding and training need no setup
    here)."""
    if not fast_path_on(model, cfg):
        reason = split_fallback(model_devices(model)) if cfg.cuda_speedups else None
        yield {"cuda_fast_path": False, "cuda_fast_path_off": reason} if reason else {}
        return
    info = {"cuda_fast_path": True, "lora": "fused"}
    llama = unwrap(model).config.model_type == "llama"
    if llama:
        from transformers.models.llama import modeling_llama
        attention = modeling_llama.ALL_ATTENTION_FUNCTIONS
        rotary, cudnn = modeling_llama.apply_rotary_pos_emb, torch.backends.cuda.cudnn_sdp_enabled()
        own_sdpa = attention._local_mapping.get("sdpa")
        info.update(fused_rms_norms=fuse_rms_norms(model), rotary="token layout", cudnn_attention=False,
                    decode_attention="one-query matmuls")
        modeling_llama.apply_rotary_pos_emb = rotary_in_token_layout
        attention["sdpa"] = functools.partial(one_query_attention, sdpa=attention["sdpa"])
        torch.backends.cuda.enable_cudnn_sdp(False)
    log.info("CUDA fast path on (--no-cuda-speedups turns it off): %s",
             ", ".join(f"{k}={v}" for k, v in info.items() if k != "cuda_fast_path"))
    try:
        with fused_lora_layers():
            yield info
    finally:
        if llama:
            modeling_llama.apply_rotary_pos_emb = rotary
            if own_sdpa is None:
                del attention["sdpa"]
            else:
                attention["sdpa"] = own_sdpa
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
            unfuse_rms_norms(model)


def fused_rms_norm(module, hidden_states: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.rms_norm(hidden_states, module.weight.shape, module.weight, module.variance_epsilon)


def fuse_rms_norms(model) -> int:
    """Run each Llama RMSNorm through torch's fused CUDA kernel: one launch forward and one backward, where
    transformers' float32 upcast, pow, mean, rsqrt and two products launch ~7 and ~10 (12% of a 7B LoRA step at
    batch 4). Same formula, float32 statistics; outputs agree to the rounding of the model's dtype. Applied on CUDA
    only: on the CPU torch composes the same small ops, so CPU runs keep transformers' own code. Returns the count."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norms = [m for m in model.modules() if type(m) is LlamaRMSNorm]
    for module in norms:
        module.forward = functools.partial(fused_rms_norm, module)
    return len(norms)


def unfuse_rms_norms(model) -> None:
    """Undo fuse_rms_norms: each RMSNorm runs transformers' own forward again."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func is fused_rms_norm:
            del module.forward


def rotary_in_token_layout(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb for Llama: q and k arrive as [batch, heads, seq, dim] views of contiguous
    [batch, seq, heads, dim] projections, and are rotated in that contiguous layout with rotate_half's sign folded
    into sin: three vectorised kernels per tensor instead of five strided ones (4% of a 7B LoRA step)."""
    half = q.shape[-1] // 2
    cos = cos.unsqueeze(2)
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(2)

    def rotate(x):
        x = x.transpose(1, 2)
        return torch.addcmul(x * cos, x.roll(half, dims=-1), sin).transpose(1, 2)

    return rotate(q), rotate(k)


def one_query_attention(module, query, key, value, attention_mask, sdpa, scaling=None, **kwargs):
    """A decode step's attention (one query per row, a boolean mask over the static cache) by transformers' eager
    formula: q·kᵀ x scaling in the model's dtype, masked, softmax in float32 and back to the dtype, ·v; the heads
    that share a key/value head are one matrix against it (no repeated keys). torch's memory-efficient kernel pads the
    one query to a 64-row tile and took 40% of a 7B decode step at 128 rows. Every other call goes to `sdpa`
    (transformers' SDPA attention)."""
    if query.shape[2] != 1 or attention_mask is None or attention_mask.dtype != torch.bool:
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    rows, heads, _, dim = query.shape
    groups = query.reshape(rows, key.shape[1], heads // key.shape[1], dim)
    scores = torch.matmul(groups, key.transpose(-1, -2)) * (dim ** -0.5 if scaling is None else scaling)
    weights = torch.softmax(torch.where(attention_mask, scores, float("-inf")), dim=-1, dtype=torch.float32)
    out = torch.matmul(weights.to(value.dtype), value)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2), None


class LoraDelta(torch.autograd.Function):
    """One vanilla LoRA adapter on its base layer's output: `result` + scaling · dropout(x)·Aᵀ·Bᵀ, computed in x's
    dtype (A and B cast from their float32 weights, as autocast does) in two matrix products, the second also adding
    the scaled product to `result` (peft: two products, a scaling, an add). Backward accumulates A's and B's float32
    gradients in place in A.grad and B.grad, straight from their products (add_product_to_grad; peft returns bf16
    gradients that are cast and then added), and folds the scaling into the dropout's backward. `p` is the dropout
    probability while training, 0 otherwise."""

    @staticmethod
    def forward(ctx, result, x, a, b, scaling: float, p: float):
        ctx.x_shape, ctx.a, ctx.b, ctx.scaling, ctx.p = x.shape, a, b, scaling, p
        x = x.reshape(-1, x.shape[-1])
        xd, mask = torch.native_dropout(x, p, True) if p else (x, None)
        a_, b_ = a.to(x.dtype), b.to(x.dtype)
        h = xd @ a_.t()
        ctx.save_for_backward(xd, h, a_, b_, mask)
        return torch.addmm(result.reshape(-1, result.shape[-1]), h, b_.t(), alpha=scaling).view(result.shape)

    @staticmethod
    def backward(ctx, grad):
        xd, h, a_, b_, mask = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gb = g @ b_  # the gradient of h, divided by the scaling
        add_product_to_grad(ctx.b, g.t(), h, ctx.scaling)
        add_product_to_grad(ctx.a, gb.t(), xd, ctx.scaling)
        gx = None
        if ctx.needs_input_grad[1]:
            gx = gb @ a_
            gx = (torch.ops.aten.native_dropout_backward(gx, mask, ctx.scaling / (1 - ctx.p)) if mask is not None
                  else gx * ctx.scaling).view(ctx.x_shape)
        return grad, gx, None, None, None, None


def add_product_to_grad(param: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, alpha: float) -> None:
    """param.grad += alpha · m1 @ m2 in param's dtype, in one product (half-precision factors into a float32 gradient
    through cuBLAS's out_dtype); the gradient is allocated as zeros on first use."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    if m1.dtype == param.dtype:
        param.grad.addmm_(m1, m2, alpha=alpha)
    else:
        torch.addmm(param.grad, m1, m2, alpha=alpha, out_dtype=param.dtype, out=param.grad)


def fused_lora_forward(module, x: torch.Tensor, *args, peft_forward, **kwargs) -> torch.Tensor:
    """peft's LoRA Linear forward through LoraDelta when the layer runs one vanilla adapter (no bias, variant, mixed
    batch or merge; the input cast to the base output's dtype, as peft's input casting is skipped under autocast);
    anything else (an adapter disabled, several, DoRA, ...) is peft's own `peft_forward`."""
    names = [name for name in module.active_adapters if name in module.lora_A]
    if (module.disable_adapters or module.merged or args or kwargs or len(names) != 1 or names[0] in module.lora_variant
            or module.lora_B[names[0]].bias is not None):
        return peft_forward(module, x, *args, **kwargs)
    name = names[0]
    result = module.base_layer(x)
    dropout = module.lora_dropout[name]
    p = dropout.p if module.training and isinstance(dropout, torch.nn.Dropout) else 0.0
    return LoraDelta.apply(result, x.to(result.dtype), module.lora_A[name].weight, module.lora_B[name].weight,
                           module.scaling[name], p)


@contextmanager
def fused_lora_layers():
    """Inside: every peft LoRA Linear layer runs fused_lora_forward (process-wide); peft's own forward is restored on
    exit, also after an exception."""
    from peft.tuners.lora import layer as lora_layer
    peft_forward = lora_layer.Linear.forward
    lora_layer.Linear.forward = functools.partialmethod(fused_lora_forward, peft_forward=peft_forward)
    try:
        yield
    finally:
        lora_layer.Linear.forward = peft_forward


@contextmanager
def lora_input_casting_skipped(peft_model, active: bool):
    """Under autocast the LoRA matmuls cast their inputs themselves: on the fast path peft's own fp32 copy of every
    LoRA input (and its fp32 dropout) is skipped, ~6% of a step."""
    from peft.helpers import disable_input_dtype_casting
    with disable_input_dtype_casting(peft_model, active=active):
        yield


def prefill_mask(mask: torch.Tensor, cache_len: int) -> torch.Tensor:
    """Boolean attention [rows, 1, width, cache_len] of a left-padded prefill into a static cache: a real token attends
    to the real tokens up to itself; a padding position to itself only (an empty row would give NaN)."""
    width = mask.shape[1]
    query, key = torch.arange(width)[:, None], torch.arange(cache_len)[None, :]
    real = torch.nn.functional.pad(mask.bool(), (0, cache_len - width))
    return ((key <= query) & (real[:, None, :] | (key == query)))[:, None]


class StaticDecoder:
    """transformers' greedy / temperature + top-p generation with a static KV cache of `rows` x `cache_len` tokens:
    an eager prefill with the injection, then one-token decode steps. On a single CUDA device the decode step is
    captured once as a CUDA graph and replayed (a 7B decode step is ~1,000 kernel launches, ~40 ms of host time when
    run eagerly); elsewhere it runs eagerly. EOS and the stopping criteria end a row, which is padded from then on;
    generation stops when every row has ended. Smaller batches are padded with one-token prompts, so one decoder (one
    cache, one graph) serves every batch of an evaluation. `inject(vectors, alphas, prompt_end, row_start)` is the
    injection's context manager around the prefill and each decode step (None: no injection); `temperature` that of
    sampled generation."""

    def __init__(self, model, tok, rows: int, cache_len: int, inject=None, temperature: float = 1.0):
        from transformers import StaticCache
        self.model, self.tok, self.rows, self.cache_len = model, tok, rows, cache_len
        self.inject = inject or (lambda *args: nullcontext())
        self.temperature = temperature
        device = input_device(model)
        self.cache = StaticCache(config=unwrap(model).config, max_cache_len=cache_len)
        # the decode step's inputs, refilled in place before each step (a graph replays on these very tensors)
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.attend = torch.zeros(rows, 1, 1, cache_len, dtype=torch.bool, device=device)
        self.vectors = torch.zeros(rows, text_config(model).hidden_size, device=device)
        self.alphas = torch.zeros(rows, device=device)
        self.after_prompt = torch.full((rows,), -1, device=device)  # every decoded position lies after the prompt
        self.graph, self.logits = None, None
        self.graphable = device.type == "cuda" and {p.device for p in model.parameters()} == {device}

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """float32 logits of the last position of each row, on the input device (where the tokens are chosen), the
        keys and values written to the cache."""
        with contiguous_lm_head(self.model):
            out = self.model(input_ids=ids, position_ids=positions, attention_mask=attend, past_key_values=self.cache,
                             use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float().to(ids.device)

    def decode_step(self) -> torch.Tensor:
        """One token per row; the injection sees only positions after the prompt (none in final-token mode)."""
        with self.inject(self.vectors, self.alphas, self.after_prompt, None):
            return self.forward(self.token, self.position, self.attend)

    def step(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        logits = self.decode_step()  # eagerly; on CUDA this first step is also the warm-up of the capture
        if self.graphable:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.logits = self.decode_step()
                self.graph = graph
            except RuntimeError as e:
                log.warning("CUDA graph capture of the decode step failed (%s); decoding eagerly", str(e).splitlines()[0])
                self.graphable = False
        return logits

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, vectors: torch.Tensor, alphas: torch.Tensor,
                 max_new_tokens: int, sample: bool, stopping_criteria=None) -> torch.Tensor:
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper
        n, width = ids.shape
        if n > self.rows or width + max_new_tokens > self.cache_len:
            raise ValueError(f"a batch of {n} x {width} tokens exceeds this decoder ({self.rows} x {self.cache_len})")
        device, pad, extra = input_device(self.model), self.tok.pad_token_id, self.rows - n
        if vectors is None:  # no injection (the decoder was built without one)
            vectors, alphas = torch.zeros(n, self.vectors.shape[1]), torch.zeros(n)
        ids = torch.cat([ids, torch.full((extra, width), pad)])
        mask = torch.cat([mask, torch.zeros(extra, width, dtype=mask.dtype)])
        mask[n:, -1] = 1
        vectors = torch.cat([vectors.float(), vectors.new_zeros(extra, vectors.shape[1], dtype=torch.float32)])
        alphas = torch.cat([alphas.float(), alphas.new_zeros(extra, dtype=torch.float32)])
        self.cache.reset()
        prompt_end, row_start = prompt_positions(mask)
        with self.inject(vectors, alphas, prompt_end, row_start):
            logits = self.forward(ids.to(device), position_ids(mask).to(device),
                                  prefill_mask(mask, self.cache_len).to(device))
        self.vectors.copy_(vectors)
        self.alphas.copy_(alphas)
        self.attend.zero_()
        self.attend[:, 0, 0, :width] = mask.bool()
        self.position.copy_(mask.sum(1, keepdim=True))
        warp = (LogitsProcessorList([TemperatureLogitsWarper(self.temperature), TopPLogitsWarper(0.95)])
                if sample else None)
        sequence = ids.to(device)
        unfinished = torch.ones(self.rows, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):  # padding rows take no part in sampling (same draws as unpadded)
            scores = logits[:n]
            token = (torch.multinomial(torch.softmax(warp(sequence[:n], scores), dim=-1), 1).squeeze(1) if sample
                     else scores.argmax(dim=-1))
            token = torch.where(unfinished, torch.nn.functional.pad(token, (0, extra), value=pad), pad)
            sequence = torch.cat([sequence, token[:, None]], dim=1)
            unfinished &= token != self.tok.eos_token_id
            if stopping_criteria is not None:
                unfinished &= ~stopping_criteria(sequence, logits)
            if step == max_new_tokens - 1 or not unfinished[:n].any():
                break
            self.token.copy_(token[:, None])
            self.attend[:, :, :, width + step] = True
            logits = self.step()
            self.position += 1
        return sequence[:n, width:].cpu()

Layout = tuple[tuple[int, int], int]  # ((rows, width), loss positions) of a fixed-shape batch, for `collate`


def pass_shape(idx: list[int], examples: list[dict]) -> tuple[int, int, int]:
    """(rows, width, loss positions) of a batch of `examples` at `idx`, unpadded."""
    return (len(idx), max(len(examples[i]["prompt"]) + len(examples[i]["completion"]) for i in idx),
            sum(len(examples[i]["completion"]) for i in idx))


def batch_layouts(batches: list[list[int]], examples: list[dict], under_kl: list[bool]) -> dict[tuple[bool, int], Layout]:
    """The fixed layouts of the CUDA fast path's training batches (`batches`: every batch of the run, indices into
    `examples`), keyed by (whether a batch holds an example under the KL term, the layout's width); each the smallest
    that fits every batch it serves, a batch going to the narrowest layout of its kind that fits (layout_key). A kind
    gets two widths where that saves a tenth of its padded tokens (width_split)."""
    by_kind: dict[bool, list[tuple[int, int, int]]] = {}
    for idx in batches:
        by_kind.setdefault(any(under_kl[i] for i in idx), []).append(pass_shape(idx, examples))
    layouts = {}
    for kl, shapes in sorted(by_kind.items()):
        for group in width_split(shapes):
            rows, width, positions = (max(shape[k] for shape in group) for k in range(3))
            layouts[kl, width] = ((rows, width), positions)
    return layouts


def width_split(shapes: list[tuple[int, int, int]], saving: float = 0.1) -> list[list[tuple[int, int, int]]]:
    """`shapes` (rows, width, positions) in one group, or in two split at the width that minimises the padded tokens
    (batches x rows x width of each group's layout) when that saves at least `saving` of one group's: each layout is
    one more CUDA graph capture (~0.4 s for a 7B), worth it for widths spread like those of replay answers."""
    def cost(group):
        return len(group) * max(s[0] for s in group) * max(s[1] for s in group) if group else 0

    best, split = cost(shapes), None
    for width in sorted({s[1] for s in shapes})[:-1]:
        groups = [[s for s in shapes if s[1] <= width], [s for s in shapes if s[1] > width]]
        if sum(map(cost, groups)) < best:
            best, split = sum(map(cost, groups)), groups
    return split if split and best <= (1 - saving) * cost(shapes) else [shapes]


def layout_key(idx: list[int], examples: list[dict], under_kl: list[bool], layouts: dict) -> tuple[bool, int]:
    """The key in batch_layouts' `layouts` of the narrowest layout of the batch's kind that fits it."""
    kl = any(under_kl[i] for i in idx)
    rows, width, positions = pass_shape(idx, examples)
    return min((key for key, ((r, w), p) in layouts.items() if key[0] == kl and r >= rows and w >= width
                and p >= positions), key=lambda key: key[1])


class GraphedStep:
    """`forward_backward` on fixed-shape batches, captured once as a CUDA graph and replayed. A 7B LoRA step at batch 4
    is ~18 ms of GPU work in thousands of kernels whose launches cost the host several times that; a replay is one
    launch.
    One eager warm-up step first allocates .grad and the cuBLAS workspaces. Gradients accumulate into the same .grad
    tensors on every replay (so they are zeroed, never set to None)."""

    def __init__(self, step, example: dict, warmup: int = 1):
        self.static = {k: v.clone() for k, v in example.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step(self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = step(self.static)

    def __call__(self, batch: dict) -> torch.Tensor:
        for key, value in batch.items():
            self.static[key].copy_(value)
        self.graph.replay()
        return self.loss.clone()


def graphed_or_eager(step, example: dict):
    """(GraphedStep of `step`, True), or (`step`, False) with a warning when the capture fails."""
    try:
        return GraphedStep(step, example), True
    except RuntimeError as e:
        log.warning("CUDA graph capture failed (%s); training eagerly", str(e).splitlines()[0])
        return step, False


class TrainingSteps:
    """How train_lora's optimizer steps run their forward+backward passes. Off the fast path a step's rows are one
    pass, or under the joint loss one pass per part (the short report rows are not padded to the answers' width; the
    loss is the same), each collated to its own shape. On the fast path a step is one pass, padded to the narrowest
    fixed layout of its kind that fits (batch_layouts, layout_key) and replayed from that layout's CUDA graph
    (GraphedStep; eager where the capture fails). `collate(idx, layout)` gives a pass's tensors on the device (layout
    None: its own shape); `step(batch, kl)` runs one pass and returns its detached loss (kl: whether it holds an
    example under the KL term)."""

    def __init__(self, examples: list[dict], under_kl: list[bool], collate, step, fast: bool, joint: bool):
        self.examples, self.under_kl, self.collate, self.fast, self.joint = examples, under_kl, collate, fast, joint
        self.step, self.layouts, self.graphed = step, {}, False
        self.step_fns = {(kl, None): functools.partial(step, kl=kl) for kl in (False, True)}

    def passes(self, idx: list[int]) -> list[list[int]]:
        if self.fast or not self.joint:
            return [idx]
        return [p for p in ([i for i in idx if self.examples[i]["part"] == part] for part in ("report", "lm")) if p]

    def key(self, idx: list[int]) -> tuple[bool, int | None]:
        if self.fast:
            return layout_key(idx, self.examples, self.under_kl, self.layouts)
        return any(self.under_kl[i] for i in idx), None

    def batch(self, idx: list[int]) -> tuple[tuple[bool, int | None], dict]:
        key = self.key(idx)
        return key, self.collate(idx, self.layouts.get(key))

    def capture(self, plan: list[list[list[int]]]) -> None:
        """One CUDA graph per layout of the whole run's passes (their warm-up gradients are dropped by zero_grad)."""
        every = [p for epoch in plan for idx in epoch for p in self.passes(idx)]
        self.layouts = batch_layouts(every, self.examples, self.under_kl)
        for key in self.layouts:
            example = next(p for p in every if self.key(p) == key)
            self.step_fns[key], on_graph = graphed_or_eager(functools.partial(self.step, kl=key[0]),
                                                            self.batch(example)[1])
            self.graphed |= on_graph

    def prepare(self, idx: list[int]) -> list[tuple]:
        """A step's passes, collated and on the device (done for a whole epoch before its first step)."""
        return [self.batch(p) for p in self.passes(idx)]

    def run(self, prepared: list[tuple]) -> torch.Tensor:
        """Forward and backward of a prepared step; its loss (detached)."""
        return sum(self.step_fns[key](batch) for key, batch in prepared)

    def zero_grad(self, optimizer) -> None:
        """A graph replays into the same .grad tensors: zeroed then, never set to None."""
        optimizer.zero_grad(set_to_none=not self.graphed)


@contextmanager
def training_steps(peft_model, cfg, examples: list[dict], under_kl: list[bool], plan, collate, step, optimizer):
    """train_lora's TrainingSteps for a run: on the fast path the CUDA graphs of every layout are captured first; the
    whole training runs with peft's input casting skipped there (lora_input_casting_skipped), as every capture did."""
    fast = fast_path_on(peft_model, cfg)
    steps = TrainingSteps(examples, under_kl, collate, step, fast, cfg.lm_mixing == "joint")
    with lora_input_casting_skipped(peft_model, fast):
        if fast:
            steps.capture(plan)
            steps.zero_grad(optimizer)
        yield steps
