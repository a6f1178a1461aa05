"""The provider table: resolution order, forcing, reporting."""

from __future__ import annotations

import dataclasses

import pytest

from sglang_hip_decode.testing import providers


@pytest.fixture
def fake_kernel(monkeypatch):
    table = providers.kernels()  # the builtins, loaded into the real table first
    copy = {name: dataclasses.replace(entry, loaders=dict(entry.loaders)) for name, entry in table.items()}
    monkeypatch.setattr(providers, "_KERNELS", copy)
    monkeypatch.setattr(providers, "_USED", {})

    def rocm():
        raise ImportError("No module named 'aiter'")

    providers.register_kernel(
        "t_kernel", doc="test", rocm=rocm, triton=lambda: (lambda: "triton"), torch=lambda: (lambda: "torch")
    )
    return "t_kernel"


def test_cpu_resolves_to_the_torch_reference(fake_kernel, monkeypatch):
    monkeypatch.setattr(providers, "_on_gpu", lambda device: False)
    res = providers.resolve(fake_kernel)
    assert res.kind == "torch" and res.fn() == "torch"
    reasons = dict(res.reasons)
    assert reasons["rocm"] in ("not a ROCm torch", "ImportError: No module named 'aiter'")
    assert reasons["triton"].startswith("no GPU")
    assert providers.used() == {fake_kernel: "torch"}
    assert providers.describe_used() == "t_kernel=torch"


def test_gpu_prefers_triton_and_rocm_first_when_it_loads(fake_kernel, monkeypatch):
    monkeypatch.setattr(providers, "_on_gpu", lambda device: True)
    assert providers.resolve(fake_kernel).kind == "triton"

    class FakeVersion:
        hip = "6.4"

    import torch

    monkeypatch.setattr(torch, "version", FakeVersion)
    providers.register_kernel(fake_kernel, rocm=lambda: (lambda: "rocm"))
    assert providers.resolve(fake_kernel).kind == "rocm"


def test_forcing_a_provider(fake_kernel, monkeypatch):
    monkeypatch.setattr(providers, "_on_gpu", lambda device: False)
    monkeypatch.setenv("SGLANG_HIP_DECODE_PROVIDER", "torch")
    assert providers.resolve(fake_kernel).kind == "torch"
    with pytest.raises(providers.ProviderUnavailable, match="provider 'triton' is not available here: no GPU"):
        providers.resolve(fake_kernel, prefer="triton")
    monkeypatch.setenv("SGLANG_HIP_DECODE_PROVIDER", "cuda")
    with pytest.raises(ValueError, match="expected one of"):
        providers.resolve(fake_kernel)


def test_nothing_available_and_unknown_kernels(fake_kernel, monkeypatch):
    providers.register_kernel("t_rocm_only", rocm=lambda: (lambda: None))
    monkeypatch.setattr(providers, "_on_gpu", lambda device: False)
    res = providers.resolve("t_rocm_only")
    assert res.kind is None and res.fn is None
    assert dict(res.reasons)["torch"] == "not implemented"
    with pytest.raises(providers.ProviderUnavailable, match="no provider available"):
        providers.get("t_rocm_only")
    with pytest.raises(KeyError, match="no kernel named"):
        providers.resolve("no_such_kernel")
    with pytest.raises(ValueError, match="unknown provider kind"):
        providers.register_kernel("x", cuda=lambda: None)


def test_every_kernel_the_patches_sit_between_has_all_three_providers():
    # The real ROCm kernel, the portable Triton stand-in and the torch reference: the kernel
    # library's PROVIDERS (plain data) names the last two for exactly the kernels the table knows.
    from sgl_hip_kernels import PROVIDERS

    table = providers.kernels()
    assert set(table) == set(PROVIDERS) == set(providers._BUILTIN_ROCM)
    assert {"fused_qk_rope_cat_and_cache_mla", "batched_gemm_afp4wfp4_pre_quant", "fused_flatten_mxfp4_quant",
            "fused_flatten_fp8_group_quant", "tilelang_sparse_fwd"} <= set(table)  # what the patches sit between
    for name, entry in table.items():
        assert set(entry.loaders) == {"rocm", "triton", "torch"}, name
        assert callable(entry.loaders["torch"]()), name  # each reference imports (the CPU's provider)
