"""The decode plan: one generation step of a Gemma3 for a single new token, in fewer and larger operations.

The model's own forward computes the same function (tests compare them); this plan exists for speed. A decode
step is a matrix-vector product per weight plus many small operations. On CPUs the plan multiplies by weights
that oneDNN packed. Its one dependency on PyTorch internals, oneDNN's packed linear weights through
`torch.ops.mkldnn`, sits behind the two functions under "oneDNN" at the bottom: if a torch release removes them,
`onednn_linear_available` turns False and decoding falls back to the model's forward, with the same tokens (in
float32; in bfloat16, up to rounding at near-ties). On
CUDA a step is a few hundred tiny kernels, each launched by Python in more time than it runs: `GraphedStep`
captures the plan's step once as a CUDA graph and replays it for each token, one launch a token.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from tinygemma.config import GLOBAL, SLIDING
from tinygemma.model import MLP, Attention, Block, Gemma3, KVCache, RMSNorm, rms_norm


class DecodePlan:
    """The weights of one decode step, rearranged for a single new token; see `decode_plan`.

    Per layer: one projection for q, k and v together (their weights stacked), one for gate and up, and the
    RMSNorm gains (1 + w) precomputed in float32, q's and k's stacked so that one norm serves all heads.
    `linear(x, weight)` multiplies by a weight prepared by `prepare(weight)`.
    """

    def __init__(self, model: Gemma3, prepare, linear):
        self.linear = linear
        self.layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                gain(layer.input_layernorm),
                prepare(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])),
                torch.cat([gain(attn.q_norm).expand(attn.n_heads, -1),
                           gain(attn.k_norm).expand(attn.n_kv_heads, -1)])[:, None, :],  # [q+kv heads, 1, hd]
                prepare(attn.o_proj.weight),
                gain(layer.post_attention_layernorm),
                gain(layer.pre_feedforward_layernorm),
                prepare(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                prepare(mlp.down_proj.weight),
                gain(layer.post_feedforward_layernorm),
            ))
        self.final_gain = gain(model.norm)
        self.head = prepare(model.lm_head.weight)

    @staticmethod
    def rope_tables(model: Gemma3, max_len: int) -> dict:
        """cos, sin and sin with the first half negated, [max_len, head_dim], for each kind of layer: the values
        `Gemma3.rope` gives position by position, so that a step only looks them up."""
        tables = {}
        for kind in (SLIDING, GLOBAL):
            cos, sin = model.rope(kind, 0, max_len, model.embed_tokens.weight.dtype)
            half = sin.shape[-1] // 2
            tables[kind] = (cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1))
        return tables

    @torch.no_grad()
    def step(self, model: Gemma3, token: torch.Tensor, cache: list[KVCache], pos: int | torch.Tensor,
             rope: dict) -> torch.Tensor:
        """Float32 logits [B, vocab] of the token [B, 1] at position `pos`: the arithmetic of `trunk`, the final
        norm and the head (the same operations on the same values), in fewer, larger operations. `pos` may be
        a 0-d tensor on the device instead of an int: the step then reads no value on the host, and attends to
        every cache slot with those not yet written masked out, so that a CUDA graph can replay it (`GraphedStep`)."""
        c, linear = model.config, self.linear
        B, H, KV, hd, eps = token.shape[0], c.n_heads, c.n_kv_heads, c.head_dim, c.rms_norm_eps
        h = model.embed_tokens(token)
        h = h * model.embed_scale.to(h.dtype)
        at = pos.view(1) if isinstance(pos, torch.Tensor) else slice(pos, pos + 1)
        cos_sin = {kind: (cos[at], sin[at]) for kind, (cos, sin) in rope.items()}
        for kind, layer, kv, weights in zip(c.layer_types, model.layers, cache, self.layers):
            input_gain, qkv_w, qk_gain, o_w, post_attn_gain, pre_ffw_gain, gate_up_w, down_w, post_ffw_gain = weights
            qkv = linear(rms_norm(h, input_gain, eps), qkv_w)  # [B, 1, (H + 2 KV) hd]
            qk = rms_norm(qkv[..., : (H + KV) * hd].view(B, H + KV, 1, hd), qk_gain, eps)
            cos, sin = cos_sin[kind]
            qk = qk * cos + qk.roll(hd // 2, dims=-1) * sin  # apply_rope, with rotate_half's sign folded into sin
            k, v = qk[:, H:], qkv[..., (H + KV) * hd :].view(B, KV, 1, hd)
            k, v, written = kv.decode_at(k, v, pos) if isinstance(pos, torch.Tensor) else (*kv.decode(k, v, pos), None)
            y = decode_attention(qk[:, :H], k, v, layer.self_attn.scale, written)
            h = h + rms_norm(linear(y.view(B, 1, H * hd), o_w), post_attn_gain, eps)
            gate, up = linear(rms_norm(h, pre_ffw_gain, eps), gate_up_w).chunk(2, dim=-1)
            h = h + rms_norm(linear(F.gelu(gate, approximate="tanh") * up, down_w), post_ffw_gain, eps)
        return linear(rms_norm(h[:, -1], self.final_gain, eps), self.head)[..., : c.vocab_size].float()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     written: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new query per sequence, q [B, H, 1, hd], to the cached k, v [B, KV, n, hd], in float32;
    only to the slots where `written` [n] is true, if given.

    Each K/V head serves its group of query heads as one matrix product (no copy of K or V). For a single
    query, SDPA's CPU kernel is several times slower than these two products (450 against 120 us at 512
    keys, 4 heads of 256), and it is the largest cost of a step after the weights.
    """
    B, H, _, hd = q.shape
    KV = k.shape[1]
    scores = torch.matmul(q.reshape(B, KV, H // KV, hd).float(), k.float().transpose(-1, -2)).mul_(scale)
    if written is not None:
        scores.masked_fill_(~written, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype).view(B, H, 1, hd)


class GraphedStep:
    """`DecodePlan.step` captured once as a CUDA graph, then replayed for each new token: the same kernels on the
    same values, without Python launching each one. The token and its position are copied into the graph's
    own input tensors (the position as a device tensor: `step` then reads nothing on the host); the logits
    come back in the graph's output tensor, valid until the next call.

    Make it before the prompt fills `cache`: capturing needs one run of the step beforehand (PyTorch's advice:
    lazy initialisation, such as cuBLAS's workspace, must not happen inside a capture), and that run writes
    position 0's slot of every layer's cache, which the prompt then overwrites. Both run on a side stream of the
    model's own GPU. The capture is begun and ended directly: `torch.cuda.graph` would also synchronise the
    device and empty torch's memory cache at each call (each `generate`), and captures on one stream made on the
    device of the process's first capture, whatever GPU the model is on.
    """

    def __init__(self, plan: DecodePlan, model: Gemma3, cache: list[KVCache], batch_size: int, rope: dict):
        device = model.embed_tokens.weight.device
        # The graph reads these tensors' memory at every replay but holds no reference to them: this does.
        self.reads = (plan, model, cache, rope)
        with torch.cuda.device(device):
            self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
            self.pos = torch.zeros((), dtype=torch.long, device=device)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(side):
                plan.step(model, self.token, cache, self.pos, rope)
                self.graph.capture_begin(capture_error_mode="thread_local")  # other threads' CUDA calls are theirs
                try:
                    self.logits = plan.step(model, self.token, cache, self.pos, rope)
                except BaseException:
                    with contextlib.suppress(RuntimeError):  # (the capture is invalid already: its own error)
                        self.graph.capture_end()
                    raise
                self.graph.capture_end()
            torch.cuda.current_stream(device).wait_stream(side)

    def __call__(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Float32 logits [B, vocab] of `token` [B, 1] at position `pos`, as `plan.step` gives them."""
        self.token.copy_(token)
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits


def gain(norm: RMSNorm) -> torch.Tensor:
    return 1.0 + norm.weight.detach().float()


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (key, probe, plan); not on the module,
# whose deepcopy, pickling (torch.save) and state would then carry oneDNN's opaque tensors


def decode_plan(model: Gemma3, pack: bool | None = None) -> DecodePlan | None:
    """The `DecodePlan` of a float32 model on a CPU with oneDNN, or a bfloat16 one on a CPU that computes in
    bfloat16 natively, its weights packed by oneDNN; of any model on CUDA, its weights plain (for `GraphedStep`);
    None anywhere else (decoding then runs the model's own forward). `pack=False` builds a plan of plain stacked
    weights for any model, which the tests use to check the plan's arithmetic apart from oneDNN.

    A decode step is one matrix-vector product per weight, which should run at memory bandwidth; ATen's plain
    paths for it do not (the packed layout is the one torch.compile's weight freezing uses for CPU linears;
    with it 270M decodes 1.5x faster in float32, 1.6x in bfloat16, with the same float32 tokens), and the rest of a
    step is the dispatch of small operations, which the plan halves. Building a plan copies the weights (0.15
    to 0.3 s for 270M), so it is kept for the model's next call, keyed on each parameter's storage and in-place
    version counter (an optimizer step, load_state_dict or .to() changes them) and on sixteen values strided
    across each: writes through .data, which no version counter sees, are seen where they change those values
    (an EMA's, a copy from another model); one that changes only other values of a weight is not, and needs
    `forget_decode_plan(model)`. Parameters made under torch.inference_mode have no version counter: their plan
    is built for each call. The copies cost as much memory as the linear weights;
    `forget_decode_plan(model)` frees them (they also go with the model).

    None, too, for a model whose forward computes something the plan does not see (`plan_sees_all`): hooks,
    pruning and other parametrizations, modules replaced or patched.
    """
    if not plan_sees_all(model):
        return None
    if pack is None:
        weight = next(model.parameters())
        pack = onednn_linear_available(weight)
        if not pack and weight.device.type != "cuda":
            return None
    params = list(model.parameters())
    if any(p.is_inference() for p in params):
        return _build_plan(model, pack)
    key = (pack, tuple((p.data_ptr(), p._version, p.dtype) for p in params))
    probe = _probe(params)
    cached = _PLANS.get(model)
    if (cached is not None and cached[0] == key and cached[1].shape == probe.shape
            and torch.allclose(cached[1], probe, rtol=0, atol=0, equal_nan=True)):  # (a NaN weight equals itself)
        return cached[2]
    forget_decode_plan(model)  # free the old copies before making new ones
    plan = _build_plan(model, pack)
    _PLANS[model] = (key, probe, plan)
    return plan


# The modules of a Gemma3 whose arithmetic the plan repeats, by their exact class (a subclass, as a LoRA adapter's
# Linear, or another module computes something else), with their forward as it was at import (a class patched
# since, as kernel-patching libraries do, computes something else too).
PLAN_MODULES = {cls: cls.forward for cls in (Block, Attention, MLP, RMSNorm, nn.Linear, nn.Embedding, nn.ModuleList)}
SAME_FORWARD = "tinygemma_same_forward"  # set on an instance's forward that computes the class's (compile, recompute)


def plan_sees_all(model: Gemma3) -> bool:
    """Whether the plan computes what the model's layers compute: not where the layers were changed past their
    weights (a forward hook or pre-hook, as `torch.nn.utils.prune` and activation steering add; a
    parametrization, such as weight norm; a module replaced by another class or given a bias; a `forward`
    patched on an instance). Decoding then runs the model's own layers, which honour them."""
    every_module = torch.nn.modules.module  # (register_module_forward_hook's hooks, on every module)
    if getattr(every_module, "_global_forward_hooks", None) or getattr(every_module, "_global_forward_pre_hooks", None):
        return False
    if type(model).trunk is not Gemma3.trunk or "trunk" in vars(model):  # (the Gemma3's own forward and hooks
        return False  # are never called by generation: it reads the trunk, norm and head apart)
    for module in model.modules():
        if module is model:
            continue
        if PLAN_MODULES.get(type(module)) is not type(module).forward:
            return False
        patched = vars(module).get("forward")
        if (module._forward_hooks or module._forward_pre_hooks or parametrize.is_parametrized(module)
                or (patched is not None and not getattr(patched, SAME_FORWARD, False))
                or getattr(module, "bias", None) is not None
                or (isinstance(module, RMSNorm) and module.eps != model.config.rms_norm_eps)):
            return False
    return True


def forget_decode_plan(model: Gemma3) -> None:
    """Free the weight copies of the model's kept decode plan, if it has one."""
    _PLANS.pop(model, None)


def _build_plan(model: Gemma3, pack: bool) -> DecodePlan:
    with torch.no_grad():
        if pack:
            return DecodePlan(model, onednn_pack, onednn_linear)
        return DecodePlan(model, torch.Tensor.detach, F.linear)


def _probe(params: list[torch.Tensor]) -> torch.Tensor:
    """Sixteen values strided across each parameter (a few hundred in all: microseconds to compare)."""
    with torch.no_grad():
        return torch.cat([p.reshape(-1)[:: max(1, p.numel() // 16)].float() for p in params])


# ------------------------------------------------------------------ oneDNN: the one boundary with torch internals
# torch.compile's CPU weight freezing uses the same two private operators; nothing else in tinygemma calls them.


def onednn_linear_available(weight: torch.Tensor) -> bool:
    """Whether oneDNN can pack this CPU weight: float32, or bfloat16 where the CPU computes in it natively."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise")
            and (weight.dtype == torch.float32
                 or (weight.dtype == torch.bfloat16 and mkldnn._is_mkldnn_bf16_supported())))


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] in oneDNN's blocked layout for a batch of one row."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with a weight packed by `onednn_pack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
