"""``@triton.jit`` bodies only; their launchers live one level up."""
