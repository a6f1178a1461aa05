"""Test-only patches on real sglang 0.5.11 methods, and a stand-in patch catalog.

Shared by the engine, plugin and CLI tests and by the subprocess scripts they start (which import
this file by path). The hunks are harmless and observable: ``RMSNorm(8).variance_epsilon``
doubles, ``RMSNorm(8).hidden_size`` grows by one.
"""

from __future__ import annotations

from sglang_hip_decode import patches as patch_set
from sglang_hip_decode.patching import Edit, Hunk, Patch
from sglang_hip_decode.testing.releases import edits_here  # noqa: F401 (the parity files skip by it)

RMSNORM = "sglang.srt.layers.layernorm:RMSNorm.__init__"
GUARD = "sglang.srt.layers.attention.nsa.nsa_indexer:Indexer._update_rope_guarded"
CORE = (
    "sglang.srt.models.deepseek_common.attention_forward_methods.forward_mla:"
    "DeepseekMLAForwardMixin.forward_absorb_core"
)

DOUBLE_EPS = Edit(RMSNORM, (Hunk("self.variance_epsilon = eps", "self.variance_epsilon = eps * 2  # test-only hunk"),))
GROW_HIDDEN = Edit(RMSNORM, (Hunk("self.hidden_size = hidden_size", "self.hidden_size = hidden_size + 1  # test-only"),))
GUARD_RAISES = Edit(GUARD, (Hunk("dst.copy_(src)", 'raise RuntimeError("test-only hunk raised here")'),))
MISSING = Edit(GUARD, (Hunk("this line is not in upstream", "x = 1"),))


def make(name, *edits, gate="any", default=False):
    return Patch(name=name, summary="test-only", edits=tuple(edits), gate=gate, default=default)


# A stand-in catalog: two implemented HIP-gated patches (one default-on, one opt-in), one that
# cannot apply (upstream "changed"), and one planned but not implemented.
ON = make("t-on", DOUBLE_EPS, gate="hip", default=True)
OPT = make("t-opt", GROW_HIDDEN, gate="hip", default=False)
BROKEN = make("t-broken", MISSING, gate="hip", default=True)
STAND_IN_PATCHES = (ON, OPT, BROKEN)
TEST_NAMES = ("t-on", "t-opt", "t-broken", "t-planned")


def stand_in_catalog():
    return [
        patch_set.Entry("t-on", "t_on", True, ON),
        patch_set.Entry("t-opt", "t_opt", False, OPT),
        patch_set.Entry("t-broken", "t_broken", True, BROKEN),
        patch_set.Entry("t-planned", "t_planned", True, None),
    ]


def install_test_catalog(setattr_=setattr):
    """Point the plugin at the stand-in catalog (``setattr_``: monkeypatch.setattr in tests)."""
    setattr_(patch_set, "catalog", stand_in_catalog)
    setattr_(patch_set, "NAMES", TEST_NAMES)
