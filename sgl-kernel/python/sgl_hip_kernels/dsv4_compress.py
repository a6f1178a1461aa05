"""The DeepSeek-V4 compressor under the import path it first had (kept stable): see ``dsv4.compress``."""

from .dsv4.compress import (CompressWorkspace, LaunchRule, compress_decode, compress_prefill,  # noqa: F401
                            launch_rule)
from .dsv4.plan import PrefillPlan, plan_prefill, ratio_geometry  # noqa: F401
