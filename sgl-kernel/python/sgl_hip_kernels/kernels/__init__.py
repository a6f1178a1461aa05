"""``@triton.jit`` pieces shared by more than one op (split-K sparse decode)."""
