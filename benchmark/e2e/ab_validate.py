"""The MI355X A/B validation runner; the same as ``python -m sglang_hip_decode.validate`` (see README)."""

import sys

from sglang_hip_decode.validate import main

if __name__ == "__main__":
    sys.exit(main())
