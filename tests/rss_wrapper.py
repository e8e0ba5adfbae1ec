"""Run the memlint command in this process and report the peak memory of every memlint process.

    python rss_wrapper.py check FILE ...

The last line on stderr is JSON: the exit code, the wall time, and the peak resident set of
this process (the parent) and of the largest child it waited for (the analysis processes:
``getrusage(RUSAGE_CHILDREN)`` is the maximum over all of them), in bytes.
"""
import json
import resource
import sys
import time


def main() -> None:
    from memlint.cli import main as memlint

    start = time.perf_counter()
    code = memlint(sys.argv[1:])
    wall = time.perf_counter() - start
    sys.stdout.flush()
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KiB on Linux, bytes on macOS
    print(json.dumps({"code": code, "wall_s": round(wall, 2),
                      "parent_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
                      "child_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale}),
          file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
