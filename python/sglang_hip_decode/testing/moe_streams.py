"""The DeepSeek-V2 MoE's single- and dual-stream forwards (``DeepseekV2MoE.forward_normal`` /
``forward_normal_dual_stream``) of the installed sglang, on a real ``DeepseekV2MoE`` made without
``__init__``, with streams that record what runs where; and ``DeepseekV2Model.__init__`` run with
stand-ins for its heavy parts, to see whether it creates the alt stream.

Stand-ins (none of them is the code under test):
* streams: ``torch.cuda.current_stream`` / ``torch.cuda.stream`` / ``torch.cuda.Stream`` are replaced by
  :class:`StreamLog`'s recording streams; every stand-in op logs ``(op, stream)``, every
  ``wait_stream`` logs ``("wait", waiter, waited)``;
* the gate is a bf16 linear; the top-k is aiter's biased grouped top-k in what matters here: it
  returns the top-k weights already multiplied by ``routed_scaling_factor`` (``apply_factor``);
* the routed experts compute ``Σ_k w_k · (x @ W_e)`` in fp32, rounded once to bf16; the shared experts
  one more linear.
The HIP flags are forced on the imported module (``_is_cuda``/``_is_musa`` False, ``_use_aiter`` and
``_is_hip`` True).
"""

from __future__ import annotations

import contextlib
import types

import torch

from .sglang_import import import_modules, swap_attrs

DV2 = "sglang.srt.models.deepseek_v2"


def import_dv2():
    (module,) = import_modules(DV2)
    return module


class StreamLog:
    """Recording streams: ``log`` holds ``(op, stream name)`` and ``("wait", waiter, waited)``."""

    def __init__(self):
        self.log: list[tuple] = []
        self.main = self.Stream("main")
        self._stack = [self.main]
        self.created: list[str] = []

    def Stream(self, name: str | None = None):  # noqa: N802 (torch.cuda.Stream's name)
        log = self.log
        if name is None:  # torch.cuda.Stream() in the code under test
            name = f"alt{len(self.created)}"
            self.created.append(name)

        class _Stream:
            def wait_stream(self, other):
                log.append(("wait", name, other.name))

            def __repr__(self):
                return f"<stream {name}>"

        s = _Stream()
        s.name = name
        return s

    def current(self):
        return self._stack[-1]

    @contextlib.contextmanager
    def stream(self, s):
        self._stack.append(s)
        try:
            yield
        finally:
            self._stack.pop()

    def op(self, name: str) -> None:
        self.log.append((name, self.current().name))

    @contextlib.contextmanager
    def installed(self):
        with swap_attrs((torch.cuda, "current_stream", lambda *a, **k: self.current()),
                        (torch.cuda, "stream", self.stream), (torch.cuda, "Stream", lambda *a, **k: self.Stream())):
            yield self


class Gate(torch.nn.Module):
    """The router: a bf16 linear (``streams``: a StreamLog to log to, or None)."""

    def __init__(self, weight, streams=None):
        super().__init__()
        self.weight, self.streams = weight, streams

    def forward(self, x, gemm_output_zero_allocator=None):
        if self.streams is not None:
            self.streams.op("gate")
        return x @ self.weight.t()


class TopK:
    """aiter's biased grouped top-k as far as the factor goes: weights come out already scaled."""

    def __init__(self, k, factor, streams=None, apply_factor=True):
        self.k, self.factor, self.streams, self.apply_factor = k, factor, streams, apply_factor

    def __call__(self, hidden_states, router_logits, expert_location_dispatch_info=None, **kwargs):
        if self.streams is not None:
            self.streams.op("topk")
        weights, ids = torch.topk(router_logits.float().softmax(-1), self.k, dim=-1)
        if self.apply_factor:
            weights = weights * self.factor
        return types.SimpleNamespace(topk_weights=weights, topk_ids=ids)


class _Experts(torch.nn.Module):
    def __init__(self, weights, streams):
        super().__init__()
        self.w, self.streams = weights, streams
        self.quant_method = object()  # not KTEPWrapperMethod
        self.moe_runner_config = types.SimpleNamespace(inplace=True)  # 0.5.12+: shared experts not deferred
        self.outputs: list[torch.Tensor] = []

    def forward(self, x, topk_output):
        self.streams.op("experts")
        picked = self.w[topk_output.topk_ids]  # (T, k, H, H)
        y = torch.einsum("th,tkhd,tk->td", x.float(), picked.float(), topk_output.topk_weights.float()).to(x.dtype)
        self.outputs.append(y.clone())
        return y


@contextlib.contextmanager
def hip_flags(dv2):
    """The deepseek_v2 module as on ROCm with aiter, in CUDA-graph capture mode, server defaults."""
    args = types.SimpleNamespace(enable_eplb=False, enable_torch_compile=False, torch_compile_max_bs=0,
                                 speculative_num_draft_tokens=None)
    with swap_attrs((dv2, "_is_cuda", False), (dv2, "_is_musa", False), (dv2, "_is_hip", True),
                    (dv2, "_use_aiter", True), (dv2, "get_global_server_args", lambda: args),
                    (dv2, "get_is_capture_mode", lambda: True)):
        yield


def bare_moe(dv2, gate, topk, experts, shared_experts, factor: float, alt_stream):
    """A real ``DeepseekV2MoE`` (no ``__init__``) around the given gate, top-k, experts and shared experts."""
    moe = dv2.DeepseekV2MoE.__new__(dv2.DeepseekV2MoE)
    torch.nn.Module.__init__(moe)
    moe.gate, moe.topk, moe.experts = gate, topk, experts
    moe._forward_shared_experts = shared_experts
    moe.routed_scaling_factor = factor
    moe.tp_size, moe.layer_id, moe.num_fused_shared_experts = 1, 0, 0
    moe._enable_a2a_moe = moe._fuse_shared_experts_inside_sbo = moe._shared_expert_tp1 = False
    moe.alt_stream = alt_stream
    return moe


class MoEPath:
    """A ``DeepseekV2MoE`` with stand-in gate, top-k and experts; call inside :meth:`hip`."""

    def __init__(self, gen: torch.Generator, tokens: int = 4, hidden: int = 32, experts: int = 8, k: int = 2,
                 factor: float = 2.5, dv2=None):
        self.dv2 = dv2 or import_dv2()
        self.streams = StreamLog()
        w = lambda *s: (torch.randn(*s, generator=gen) * s[-1] ** -0.5).to(torch.bfloat16)  # noqa: E731
        shared = w(hidden, hidden)

        def shared_experts(hidden_states, gemm_output_zero_allocator=None):
            self.streams.op("shared_experts")
            return hidden_states @ shared.t()

        self.moe = bare_moe(self.dv2, Gate(w(experts, hidden), self.streams), TopK(k, factor, self.streams),
                            _Experts(w(experts, hidden, hidden), self.streams), shared_experts, factor,
                            self.streams.Stream("alt"))
        self.x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)

    @contextlib.contextmanager
    def hip(self):
        """HIP with aiter, CUDA-graph capture (where the dual stream runs), the recording streams."""
        with hip_flags(self.dv2), self.streams.installed():
            yield self

    def single(self):
        return self.moe.forward_normal(self.x.clone())

    def dual(self):
        return self.moe.forward_normal_dual_stream(self.x.clone())

    def dispatched(self):
        """``DeepseekV2MoE.forward``: which path its own dispatch takes (capture mode, a stream)."""
        return self.moe.forward(self.x.clone())


def model_alt_stream(dv2=None, env: dict | None = None):
    """Run the real ``DeepseekV2Model.__init__`` (HIP flags forced, one layer, its heavy parts stood
    in) and return ``(model.alt_stream, the stream each layer was handed, the StreamLog)``."""
    dv2 = dv2 or import_dv2()
    streams = StreamLog()
    handed = []

    class Layer(torch.nn.Module):
        def __init__(self, *args, alt_stream=None, **kwargs):
            super().__init__()
            handed.append(alt_stream)
            self.mlp = torch.nn.Identity()

    def make_layers(num, layer_fn, **kwargs):
        return torch.nn.ModuleList([layer_fn(i, f"layers.{i}") for i in range(num)]), 0, num

    pp = types.SimpleNamespace(is_first_rank=False, is_last_rank=False, rank_in_group=0, world_size=1)
    a2a = types.SimpleNamespace(is_deepep=lambda: False, is_mooncake=lambda: False)
    config = types.SimpleNamespace(pad_token_id=0, vocab_size=16, first_k_dense_replace=0, num_hidden_layers=1,
                                   hidden_size=8, rms_norm_eps=1e-6, n_routed_experts=8)
    changes = [(dv2, "_is_cuda", False), (dv2, "_is_musa", False), (dv2, "_is_hip", True),
               (dv2, "_use_aiter_gfx95", False), (dv2, "get_pp_group", lambda: pp),
               (dv2, "make_layers", make_layers), (dv2, "DeepseekV2DecoderLayer", Layer),
               (dv2, "get_moe_a2a_backend", lambda: a2a)]
    for name in ("is_nsa_enable_prefill_cp", "is_dsa_enable_prefill_cp"):
        if hasattr(dv2, name):
            changes.append((dv2, name, lambda: False))
    with contextlib.ExitStack() as stack:
        for key, value in (env or {}).items():
            stack.enter_context(_env(key, value))
        stack.enter_context(swap_attrs(*changes))
        stack.enter_context(streams.installed())
        model = dv2.DeepseekV2Model(config)
    return model.alt_stream, handed, streams


@contextlib.contextmanager
def _env(key: str, value: str):
    import os

    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
