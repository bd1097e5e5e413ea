"""The main job on a cached full testbed: wall and CPU time of `vlm-probe analyze`, per section.

Goal: the whole analysis (freezing variants cached with the testbed) in at most 2 minutes on
2 CPU cores. The first run builds the testbed (and its freezing variants) if they are not
cached; that build is timed by benchmarks/testbed_build.py, not here, so run this twice or
point VLM_PROBE_CACHE at a cache that holds the build.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm", action="store_true", help="run once first so the testbed and variants are cached")
    args = parser.parse_args()
    exe = str(Path(sys.executable).parent / "vlm-probe")
    out = Path(tempfile.mkdtemp()) / "report"
    command = [exe, "analyze", "--out", str(out), "-q"]
    if args.warm:
        subprocess.run(command, check=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    run = json.loads((out / "run.json").read_text())
    print(f"machine: {os.cpu_count()} cores; cache: {os.environ.get('VLM_PROBE_CACHE', '~/.cache/vlm_probe')}")
    for name, seconds in run["timings_s"].items():
        print(f"  {name:<16} {seconds:7.1f} s")
    print(f"whole command: {wall:.1f} s wall, {cpu:.1f} s CPU (goal <= 120 s wall)")


if __name__ == "__main__":
    main()
