"""Fetch every verified sglang release's wheel and install the parity releases, for `make test`.

* ``.releases/wheels/``: the wheel of each release in ``gates.VERIFIED_RELEASES`` (``pip download
  --no-deps``; about 280 MB in all), read as text by test/test_releases.py's status test.
* ``.releases/<version>/``: ``pip install --no-deps --no-compile --target`` of each release in
  ``PARITY`` (0.5.11 is the test venv's own sglang); a test process selects one with ``PYTHONPATH``.

Idempotent: what is already there is kept. Run with the test venv's Python (it needs pip and this
package's ``gates``). Exit 1, saying which, when a wheel cannot be fetched.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from sglang_hip_decode.gates import VERIFIED_RELEASES  # noqa: E402

# The releases whose parity suites run in their own processes (test_releases.py): the last of the
# 0.5.12 line (mxfp4-vbmm-layout and the nsa guard still ours), the first DSA line, the newest.
PARITY = ("0.5.12.post1", "0.5.13.post1", "0.5.23")
RELEASES = ROOT / ".releases"
WHEELS = RELEASES / "wheels"


def wheel(version: str) -> pathlib.Path | None:
    found = sorted(WHEELS.glob(f"sglang-{version}-*.whl"))
    return found[0] if found else None


def target(version: str) -> pathlib.Path:
    return RELEASES / version


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args], check=True)


def main() -> int:
    WHEELS.mkdir(parents=True, exist_ok=True)
    missing = []
    for version in VERIFIED_RELEASES:
        if wheel(version) is not None:
            continue
        local = sorted((ROOT / ".whl").glob(f"sglang-{version}-*.whl"))
        if local:
            shutil.copy2(local[0], WHEELS / local[0].name)
            continue
        try:
            _pip("download", "--no-deps", f"sglang=={version}", "-d", str(WHEELS))
        except subprocess.CalledProcessError:
            missing.append(version)
    if missing:
        print(f"release_wheels: cannot fetch the wheels of sglang {', '.join(missing)}", file=sys.stderr)
        return 1
    for version in PARITY:
        where = target(version)
        if (where / "sglang" / "_version.py").is_file():
            continue
        partial = where.with_name(where.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _pip("install", "--no-deps", "--no-compile", "--target", str(partial), str(wheel(version)))
        shutil.rmtree(where, ignore_errors=True)
        partial.rename(where)  # a half-finished install never looks finished
    print(f"release_wheels: {len(VERIFIED_RELEASES)} wheels in {WHEELS.relative_to(ROOT)}, "
          f"parity releases {', '.join(PARITY)} in {RELEASES.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
