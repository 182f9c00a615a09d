"""Run one lowbit command in this process and record what it cost: `python bench/measured_run.py OUT.json -- ARGS`.

OUT.json gets: exit code, wall seconds, peak RSS (getrusage), bytes read/written (/proc/self/io: rchar/wchar
are every read()/write(), read_bytes/write_bytes what reached the disk), the 1-minute load average at the
start and end, and the stderr line "lowbit: METHOD: N blocks in S s" when the command prints one.
"""
from __future__ import annotations

import io
import json
import os
import resource
import sys
import time


def proc_io() -> dict:
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(": ") for line in f.read().splitlines())}
    except OSError:
        return {}


def main() -> None:
    out = sys.argv[1]
    args = sys.argv[sys.argv.index("--") + 1:]
    load0 = os.getloadavg()[0]
    t0 = time.time()
    sys.argv = ["lowbit", *args]
    err = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s):
            err.write(s)
            return sys.__stderr__.write(s)

        def flush(self):
            sys.__stderr__.flush()

    sys.stderr = Tee()
    code = 0
    try:
        from lowbit.cli import main as cli_main

        cli_main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stderr = sys.__stderr__
        wall = time.time() - t0
        pio = proc_io()
        blocks = [ln for ln in err.getvalue().replace("\r", "\n").splitlines() if " blocks in " in ln]
        rec = {"args": args, "exit": code, "wall_s": round(wall, 1),
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "rchar": pio.get("rchar"), "wchar": pio.get("wchar"), "read_bytes": pio.get("read_bytes"),
               "write_bytes": pio.get("write_bytes"), "loadavg_1m_start": load0,
               "loadavg_1m_end": os.getloadavg()[0], "blocks_line": blocks[-1].strip() if blocks else None}
        with open(out, "w") as f:
            json.dump(rec, f)
    sys.exit(code)


if __name__ == "__main__":
    main()
