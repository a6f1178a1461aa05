"""trace-diff: synthetic ROCm- and CUDA-style traces (eager launches and a graph replay), the name
normaliser, every unreadable-trace error, and real torch.profiler traces of the decode harness
(CPU: aten ops; GPU: kernels, eager and a CUDA-graph replay)."""

from __future__ import annotations

import gzip
import json

import pytest

from sglang_hip_decode import cli, tracediff
from sglang_hip_decode.tracediff import normalise_kernel

from trace_fixtures import CAT_CUDA, COPY_CUDA, FILL, Trace, event


@pytest.mark.parametrize("raw, expect", [
    (CAT_CUDA.format(n=64), "CatArrayBatchedCopy<...>"),
    (CAT_CUDA.format(n=128), "CatArrayBatchedCopy<...>"),
    (COPY_CUDA, "elementwise_kernel<...>[direct_copy_kernel_cuda]"),
    (FILL, "vectorized_elementwise_kernel<...>[FillFunctor]"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(cutlass_80_wmma_"
     "tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8::Params)",
     "Kernel2<...>[cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8]"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, at::native::"
     "sum_functor<float, float, float>::operator()(at::TensorIterator&)::{lambda(float, float)#1}>, unsigned int, float, "
     "4, 4> >(at::native::ReduceOp<float, float, 4, 4>)", "reduce_kernel<...>[sum_functor]"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::AUnaryFunctor<c10::BFloat16, c10::BFloat16, "
     "c10::BFloat16, at::native::binary_internal::MulFunctor<float> >, std::array<char*, 2ul> >(int, at::native::"
     "AUnaryFunctor<c10::BFloat16, c10::BFloat16, c10::BFloat16, at::native::binary_internal::MulFunctor<float> >, "
     "std::array<char*, 2ul>)", "vectorized_elementwise_kernel<...>[MulFunctor]"),  # from an H200 trace
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl<at::native::direct_copy_kernel_cuda("
     "at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda(c10::BFloat16)#1}>(at::TensorIteratorBase&, "
     "...)::{lambda(int)#1}>(int, ...)", "elementwise_kernel<...>[direct_copy_kernel_cuda]"),  # the casting path
    ("void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::silu_kernel(at::"
     "TensorIteratorBase&)::{lambda()#1}::operator()() const::{lambda(c10::BFloat16)#1}, std::array<char*, 2ul> >(int, "
     "...)", "vectorized_elementwise_kernel<...>[silu_kernel]"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>, unsigned int, "
     "long, 4, 4> >(at::native::ReduceOp<float, at::native::ArgMaxOps<float>, unsigned int, long, 4, 4>)",
     "reduce_kernel<...>[ArgMaxOps]"),
    ("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90<"
     "2> > > >(flash::enable_sm90_or_later<...>::Params)", "device_kernel<...>[FlashAttnFwdSm90]"),
    ("_sparse_mla_splitk_kernel", "_sparse_mla_splitk_kernel"),  # Triton: the jit function's name
    ("_ZN5aiter38mla_a8w8_qh16_qseqlen1_gqaratio16_psE", "_ZN5aiter38mla_a8w8_qh16_qseqlen1_gqaratio16_psE"),
    ("void mscclpp::foo(int", "foo"),  # a truncated parameter list
])
def test_normalise_kernel(raw, expect):
    assert normalise_kernel(raw) == expect


LAYERS = 3


def decode_kernels(patched: bool, rocm: bool, bs: int) -> list[tuple[str, float]]:
    """A 3-layer decode step: per layer rope, [cat], attention, o_proj; then one sampler."""
    attn = "_ZN5aiter38mla_a8w8_qh16_qseqlen1_gqaratio16_psE" if rocm else "_sparse_mla_splitk_kernel"
    out = []
    for layer in range(LAYERS):
        out.append(("_fused_qk_rope_cat_kernel", 2.0))
        if not patched:
            out.append((CAT_CUDA.format(n=64 if layer % 2 else 128), 2.5))  # two instantiations, one row
        out += [(attn, 30.0 + bs), ("Cijk_Alik_Bljk_BBS_BH_MT64x64" if rocm else "nvjet_tst_64x8", 4.0)]
    return out + [(FILL, 1.0)]


def write_pair(tmp_path, rocm: bool, graph: bool, gz: bool = False, gpu_span_only: bool = False):
    paths = {}
    for arm in ("off", "on"):
        t = Trace(rocm)
        t.step("step[EXTEND bs=4 toks=4096]", [(CAT_CUDA.format(n=64), 50.0)] * 7)  # prefill: not a decode step
        for bs in (4, 4, 3):
            t.step(f"step[DECODE bs={bs}]", decode_kernels(arm == "on", rocm, bs), graph=graph,
                   gpu_span_only=gpu_span_only)
        t.event("kernel", COPY_CUDA, t.t + 100, 9.0, 0, 7, correlation=999_999)  # after the profile's last step
        paths[arm] = t.write(tmp_path / f"{arm}.trace.json{'.gz' if gz else ''}", gz=gz)
    return paths


@pytest.mark.parametrize("rocm, graph, gz, gpu_span_only", [
    (True, False, True, False), (True, True, True, False), (False, False, False, False), (False, True, True, False),
    (True, False, False, True),  # no launch correlation: the gpu_user_annotation spans place the kernels
], ids=["rocm-eager-gz", "rocm-graph-gz", "cuda-eager", "cuda-graph-gz", "rocm-gpu-span-only"])
def test_synthetic_traces(tmp_path, rocm, graph, gz, gpu_span_only):
    paths = write_pair(tmp_path, rocm, graph, gz, gpu_span_only)
    result = tracediff.compare(paths["off"], paths["on"])
    assert result["events"] == "kernels"
    assert result["layers"] == LAYERS and result["layers_inferred"]
    assert result["off"]["decode_steps"] == result["on"]["decode_steps"] == 3
    assert result["off"]["step_labels"] == {"step[DECODE bs=4]": 2, "step[DECODE bs=3]": 1}
    assert result["removed"] == ["CatArrayBatchedCopy<...>"] and result["added"] == []
    rows = {r["name"]: r for r in result["rows"]}
    cat = rows["CatArrayBatchedCopy<...>"]
    assert (cat["count_off"], cat["count_on"], cat["count_off_per_layer"]) == (3, 0, 1)
    assert cat["us_off"] == pytest.approx(7.5) and cat["delta_us"] == pytest.approx(-7.5)
    assert len(cat["raw_names"]) == 2  # both instantiations behind the one row
    assert result["net_us_per_step"] == pytest.approx(-7.5) and result["net_us_per_layer"] == pytest.approx(-2.5)
    same = [r for r in result["rows"] if r["status"] == "same"]
    assert len(same) == 4 and all(r["delta_us"] == pytest.approx(0) for r in same)
    assert result["off"]["per_step"]["count"] == 3 * 4 + 1 and result["on"]["per_step"]["count"] == 3 * 3 + 1
    # the prefill's 7 cats and the kernel after the last step are outside every decode step
    assert result["off"]["outside_decode_steps"] == result["on"]["outside_decode_steps"] == 8
    text = tracediff.render(result)
    assert "CatArrayBatchedCopy<...>  removed" in text and "3 → 0" in text and "1 → 0" in text
    assert "net: -7.5 µs per decode step (-2.50 µs per layer)" in text
    assert "_fused_qk_rope_cat_kernel" not in text and "_fused_qk_rope_cat_kernel" in tracediff.render(result, True)


def test_added_and_changed_kernels_and_explicit_layers(tmp_path):
    t_off, t_on = Trace(False), Trace(False)
    for _ in range(2):
        t_off.step("step[DECODE bs=1]", [("a", 1.0), ("b", 2.0), ("b", 2.0)])
        t_on.step("step[DECODE bs=1]", [("a", 1.0), ("b", 2.0), ("c", 0.5)])
    result = tracediff.compare(t_off.write(tmp_path / "off.json"), t_on.write(tmp_path / "on.json"), layers=2)
    rows = {r["name"]: r for r in result["rows"]}
    assert not result["layers_inferred"] and result["layers"] == 2
    assert rows["b"]["status"] == "changed" and (rows["b"]["count_off"], rows["b"]["count_on"]) == (2, 1)
    assert rows["c"]["status"] == "added" and result["added"] == ["c"] and result["removed"] == []
    assert result["net_us_per_step"] == pytest.approx(-1.5) and result["net_us_per_layer"] == pytest.approx(-0.75)


def test_cli_prints_text_and_json(tmp_path, capsys):
    paths = write_pair(tmp_path, rocm=True, graph=True)
    assert cli.main(["trace-diff", str(paths["off"]), str(paths["on"])]) == 0
    assert "CatArrayBatchedCopy<...>" in capsys.readouterr().out
    assert cli.main(["trace-diff", str(paths["off"]), str(paths["on"]), "--json", "--layers", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["removed"] == ["CatArrayBatchedCopy<...>"] and data["layers_inferred"] is False
    with pytest.raises(SystemExit):
        cli.main(["trace-diff", str(paths["off"]), str(paths["on"]), "--layers", "0"])
    assert "a whole number >= 1" in capsys.readouterr().err


def _bad_traces(tmp_path):
    good = write_pair(tmp_path, rocm=False, graph=False)["off"]
    text = good.read_text()
    cases = {
        "truncated.json": (text[: len(text) // 2], "truncated"),
        "truncated.json.gz": (gzip.compress(text.encode())[:200], "truncated or damaged gzip"),
        "not_a_trace.json": (json.dumps({"hello": 1}), "no 'traceEvents' list"),
        "binary.json": (b"\xff\xfe\x00garbage", "not a chrome trace"),
        "empty.json": (json.dumps({"traceEvents": []}), "no complete"),
        "no_steps.json": (json.dumps({"traceEvents": [
            {"ph": "X", "cat": "user_annotation", "name": "step[EXTEND bs=1 toks=9]", "ts": 0, "dur": 5, "pid": 1, "tid": 1},
            {"ph": "X", "cat": "kernel", "name": "k", "ts": 1, "dur": 1, "pid": 0, "tid": 7}]}),
            "no decode step spans matching"),
        "unattributed.json": (json.dumps({"traceEvents": [
            {"ph": "X", "cat": "user_annotation", "name": "step[DECODE bs=1]", "ts": 0, "dur": 5, "pid": 1, "tid": 1},
            {"ph": "X", "cat": "kernel", "name": "k", "ts": 100, "dur": 1, "pid": 0, "tid": 7}]}),
            "no GPU event could be attributed"),
    }
    return good, cases


def test_unreadable_traces_say_why(tmp_path, capsys):
    good, cases = _bad_traces(tmp_path)
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(tracediff.TraceError, match=message):
            tracediff.read_steps(path)
        assert cli.main(["trace-diff", str(path), str(good)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(path) in err, name
    assert len(cases) == 7
    with pytest.raises(tracediff.TraceError, match="cannot read"):
        tracediff.read_steps(tmp_path / "missing.json")
    with pytest.raises(tracediff.TraceError, match="not a regular expression"):
        tracediff.read_steps(good, step_marker="step[")
    with pytest.raises(tracediff.TraceError, match="no GPU kernel events"):
        tracediff.read_steps(_cpu_only(tmp_path), events="kernels")


def _cpu_only(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"traceEvents": [
        {"ph": "X", "cat": "user_annotation", "name": "step[DECODE bs=1]", "ts": 0, "dur": 50, "pid": 1, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::cat", "ts": 1, "dur": 3, "pid": 1, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 10, "dur": 3, "pid": 1, "tid": 2}]}))  # other thread
    return path


def test_cpu_trace_compares_ops_of_the_step_thread(tmp_path):
    steps = tracediff.read_steps(_cpu_only(tmp_path))
    assert steps.events == "ops" and steps.steps[0].counts == {"aten::cat": 1} and steps.outside == 1
    with pytest.raises(tracediff.TraceError, match="cannot compare ops"):
        tracediff.diff(steps, tracediff.read_steps(write_pair(tmp_path, rocm=True, graph=False)["on"]))


# --- real torch.profiler traces of the decode harness (sglang 0.5.11's NSA decode, nsa-cat-skip) ---

def _profile_harness(tmp_path, device: str, graph: bool = False):
    import torch

    from patch_fixtures import edits_here
    from sglang_hip_decode import patching
    from sglang_hip_decode.patches.nsa_cat_skip import PATCH
    from sglang_hip_decode.testing.mla_decode import MlaDecodeCase, MlaDecodePath, import_sglang, make_inputs

    ok, why = edits_here(PATCH)
    if not ok:
        pytest.skip(why)
    small = dict(heads=4, topk=32, context=64, hidden=64) if device == "cpu" else dict(heads=8, topk=2048, context=4096)
    case = MlaDecodeCase(batch=2, layers=2, device=device, **small)
    gen = torch.Generator().manual_seed(5)
    path = MlaDecodePath(case, gen, import_sglang())
    x = make_inputs(case, gen)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    traces = {}
    with path.hip():
        for arm, patches in (("off", ()), ("on", (PATCH,))):
            with patching.applied(*patches):
                fb = path.forward_batch(x)
                step = lambda: path.step(x, fb)  # noqa: E731
                if graph:
                    from sgl_hip_kernels.testing import timing

                    g = timing.capture(step, 1)
                    step = g.replay
                step()
                with torch.profiler.profile(activities=activities) as prof:
                    for _ in range(2):
                        with torch.profiler.record_function(f"step[DECODE bs={case.batch}]"):
                            step()
                    if device == "cuda":
                        torch.cuda.synchronize()
            traces[arm] = tmp_path / f"{arm}.trace.json"
            prof.export_chrome_trace(str(traces[arm]))
    return traces, case


def test_real_cpu_trace_of_the_decode_harness(tmp_path):
    traces, case = _profile_harness(tmp_path, "cpu")
    result = tracediff.compare(traces["off"], traces["on"], layers=case.layers)
    assert result["events"] == "ops" and result["off"]["decode_steps"] == result["on"]["decode_steps"] == 2
    cat = {r["name"]: r for r in result["rows"]}["aten::cat"]
    assert cat["count_off"] - cat["count_on"] == case.layers  # one cat per layer per step gone
    assert cat["count_off_per_layer"] - cat["count_on_per_layer"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda-graph"])
def test_gpu_trace_of_the_decode_harness(tmp_path, graph):
    traces, case = _profile_harness(tmp_path, "cuda", graph=graph)
    result = tracediff.compare(traces["off"], traces["on"], layers=case.layers, events="kernels")
    assert result["off"]["decode_steps"] == result["on"]["decode_steps"] == 2
    assert result["removed"] == ["CatArrayBatchedCopy<...>"] and result["added"] == []
    cat = {r["name"]: r for r in result["rows"]}["CatArrayBatchedCopy<...>"]
    assert (cat["count_off"], cat["count_on"], cat["count_off_per_layer"]) == (case.layers, 0, 1)
    assert cat["us_off"] > 0 and cat["delta_us"] == -cat["us_off"]
    assert all(r["status"] in ("same", "slower", "faster", "removed") for r in result["rows"])  # no count changed but the cat's


def test_attribution_on_two_streams_and_launches_outside_a_step(tmp_path):
    # Three steps, each with a kernel on the main stream (7) and one on an alt stream (8), placed by
    # their GPU spans only (no correlation on the kernels); a kernel launched between two steps (the
    # scheduler preparing the next batch) runs during step 0's GPU span: it belongs to no step.
    ev = []
    for k in range(3):
        t = 100 * k
        ev += [event("user_annotation", "step[DECODE bs=1]", t, 10, 1, 1),
               event("gpu_user_annotation", "step[DECODE bs=1]", t + 20, 30, 0, 7),
               event("gpu_user_annotation", "step[DECODE bs=1]", t + 22, 20, 0, 8),
               event("kernel", "main", t + 21, 5, 0, 7), event("kernel", "alt", t + 23, 5, 0, 8)]
    ev += [event("cuda_runtime", "cudaLaunchKernel", 12, 1, 1, 1, correlation=77),
           event("kernel", "prep_next_batch", 30, 2, 0, 9, correlation=77)]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": ev}))
    steps = tracediff.read_steps(path)
    assert [dict(s.counts) for s in steps.steps] == [{"main": 1, "alt": 1}] * 3 and steps.outside == 1


def test_a_merged_multi_rank_trace_is_refused(tmp_path):
    ev = [event("user_annotation", "step[DECODE bs=1]", 0, 10, pid, 1) for pid in (100, 200)]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": ev}))
    with pytest.raises(tracediff.TraceError, match="decode steps from 2 processes"):
        tracediff.read_steps(path)


def test_an_unchanged_count_that_got_slower_is_listed(tmp_path):
    t_off, t_on = Trace(False), Trace(False)
    for _ in range(2):
        t_off.step("step[DECODE bs=1]", [("gemm", 10.0), ("norm", 1.0)])
        t_on.step("step[DECODE bs=1]", [("gemm", 20.0), ("norm", 1.01)])
    result = tracediff.compare(t_off.write(tmp_path / "off.json"), t_on.write(tmp_path / "on.json"), layers=1)
    rows = {r["name"]: r["status"] for r in result["rows"]}
    assert rows == {"gemm": "slower", "norm": "same"}
    assert any(line.split()[:2] == ["gemm", "slower"] for line in tracediff.render(result).splitlines())
