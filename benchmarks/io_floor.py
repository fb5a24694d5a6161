"""The I/O floor of a static merge: read every input file once, write and fsync one output of the same size.

    python benchmarks/io_floor.py OUT_DIR --write-like BASE_DIR INPUT_FILE...

No merge math and no torch (its import alone takes a second): one thread reads each input once, front to back, in
16 MiB reads into reused buffers (from the page cache when the files are cached, as they are for the tools it is
compared with); the base's bytes go on into OUT_DIR/model.safetensors as they are read, written the way rankmerge
writes its shards — whole chunks with O_DIRECT where the file system allows it, the tail through the page cache —
and the file and its folder are fsynced. benchmarks/static_merge.py times it like the tools, in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import mmap
import os
import time
from pathlib import Path

CHUNK = 16 * 2**20  # a multiple of the 4 KiB direct-I/O alignment; mmap gives a page-aligned buffer


def read_into(fd: int, buf: memoryview) -> int:
    """Fill `buf` from `fd` (fewer bytes only at the end of the file)."""
    got = 0
    while got < len(buf) and (n := os.readv(fd, [buf[got:]])) > 0:
        got += n
    return got


def read_and_write(inputs: list[Path], written: list[Path], out: Path) -> tuple[int, int]:
    """Read every input once; the bytes of `written` (among the inputs) go on, back to back, into `out`:
    whole chunks with O_DIRECT, the tail buffered, then fsync of the file and its folder."""
    stage, scratch = memoryview(mmap.mmap(-1, CHUNK)), memoryview(mmap.mmap(-1, CHUNK))
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        direct = os.open(out, os.O_WRONLY | os.O_DIRECT)
    except OSError:  # no direct I/O on this file system
        direct = fd
    read, offset, fill = 0, 0, 0
    for path in inputs:
        src = os.open(path, os.O_RDONLY)
        try:
            if path in written:
                while (n := read_into(src, stage[fill:])) > 0:
                    read, fill = read + n, fill + n
                    if fill == CHUNK:
                        os.pwrite(direct, stage, offset)
                        offset, fill = offset + CHUNK, 0
            else:
                while (n := read_into(src, scratch)) > 0:
                    read += n
        finally:
            os.close(src)
    if fill:
        os.pwrite(fd, stage[:fill], offset)
    os.fsync(fd)
    if direct != fd:
        os.close(direct)
    os.close(fd)
    folder = os.open(out.parent, os.O_RDONLY)
    os.fsync(folder)
    os.close(folder)
    return read, offset + fill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--write-like", type=Path, required=True, help="the base folder: its safetensors are rewritten")
    ap.add_argument("inputs", type=Path, nargs="+", help="every input file the merge reads")
    args = ap.parse_args()
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    written = sorted(args.write_like.glob("*.safetensors"))
    read, wrote = read_and_write(written + [p for p in args.inputs if p not in written], written, args.out / "model.safetensors")
    print(f"read {read / 1e9:.2f} GB, wrote and fsynced {wrote / 1e9:.2f} GB in {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
