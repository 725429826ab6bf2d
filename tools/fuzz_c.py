#!/usr/bin/env python3
"""Build and run the libFuzzer harnesses of the project's C code, with ASan and UBSan.

    python tools/fuzz_c.py build                      # all harnesses into build/fuzz/
    python tools/fuzz_c.py run stub --runs 1000000    # or --seconds N; extra args go to libFuzzer
    python tools/fuzz_c.py run pages --seconds 60 -jobs=2
    python tools/fuzz_c.py coverage stub [DIR ...]    # line/region coverage of stub.c by a corpus
    python tools/fuzz_c.py coverage channels DIR --functions   # function by function

Harnesses (tools/fuzz/*.c):

- ``stub``: the stub's device model (migrate/stub/src: UART, virtio-blk, device state),
  with a fake guest-RAM window and block back end;
- ``pages``: the reader's C check of page entries (migrate/stream/_build_pages.py),
  against a reference, its scan of a run of HVM context records (inputs starting
  0xC5), each record it passes checked again by the reader's rules, and its encoding of
  the stub's device state as DEVICE_STATE bodies (inputs starting 0xD5);
- ``placement``: the data plane's placement of page batches into guest memory
  (migrate/dataplane/dataplane.c, dp_target_place: what a restore does with each batch),
  against a model of guest memory;
- ``runloop``: the vCPU run loop's exit decoding (migrate/kvm/runloop.c) with a fake KVM_RUN;
- ``channels``: the data plane's channel receiver (migrate/dataplane/dataplane.c,
  dp_receiver_*: what a relocation's destination does with the bytes of its data channels),
  one to three plain channels over socketpairs into a model of guest memory, its verdict
  against a checker written from the spec.

Each has a small corpus in tests/fuzz-corpus/NAME (new inputs of a run go to a scratch
directory unless --grow-corpus). Needs clang with libFuzzer (Debian: clang and
libclang-rt-14-dev; .ci/run installs them); tests/test_fuzz_c.py runs each for a few
seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HARNESSES = ROOT / "tools" / "fuzz"
BUILD = ROOT / "build" / "fuzz"
CORPORA = ROOT / "tests" / "fuzz-corpus"
NAMES = ("stub", "pages", "placement", "runloop", "channels")
FLAGS = ["-g", "-O1", "-fno-omit-frame-pointer", "-fsanitize=fuzzer,address,undefined",
         "-fno-sanitize-recover=all", "-Wall", "-Wextra", "-Werror", "-Wno-unused-function",
         "-Wno-unused-parameter"]
# Code under test compiled apart, with coverage; the harness file itself without it
UNDER_TEST = {"pages": [BUILD / "pages_impl.c"], "stub": [ROOT / "migrate" / "stub" / "src" / "netdev.c"],
              "placement": [ROOT / "migrate" / "dataplane" / "dataplane.c"],
              "channels": [ROOT / "migrate" / "dataplane" / "dataplane.c"]}
LIBS = {"placement": ["-lssl", "-lcrypto", "-lzstd", "-lxxhash", "-lz", "-lpthread"],
        "channels": ["-lssl", "-lcrypto", "-lzstd", "-lxxhash", "-lz", "-lpthread"],
        "pages": ["-lz", "-lpthread"]}             # crc32_fold.h: zlib for short tails
# as cffi builds them (Python.h defines _GNU_SOURCE; dataplane/_build.py's warning flags)
EXTRA = {"placement": ["-D_GNU_SOURCE", "-Wno-sign-compare"], "channels": ["-D_GNU_SOURCE", "-Wno-sign-compare"]}
# Harnesses that compile code under test into their own file (the stub's statics): they
# keep coverage instrumentation
WHOLE = {"stub"}
INCLUDES = {
    "stub": [HARNESSES, ROOT / "migrate" / "stub" / "src", ROOT / "migrate" / "guest" / "src"],
    "pages": [BUILD, ROOT / "migrate" / "stream"],     # crc32_fold.h
    "runloop": [ROOT / "migrate" / "kvm"],
    "placement": [],
    "channels": [],
}


def clang() -> str | None:
    for name in ("clang", "clang-14", "clang-15", "clang-16", "clang-17", "clang-18", "clang-19"):
        if shutil.which(name):
            return name
    return None


def missing() -> str | None:
    """Why the harnesses cannot be built here, or None: clang and its libFuzzer runtime."""
    cc = clang()
    if cc is None:
        return "no clang (Debian: apt-get install clang libclang-rt-14-dev; .ci/run does)"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text("#include <stdint.h>\n#include <stddef.h>\n"
                       "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { return 0; }\n")
        done = subprocess.run([cc, "-fsanitize=fuzzer,address,undefined", str(src), "-o", str(Path(tmp) / "probe")],
                              capture_output=True, text=True)
        if done.returncode:
            return f"{cc} cannot link libFuzzer with ASan/UBSan (Debian: libclang-rt-14-dev): " + \
                done.stderr.strip().splitlines()[-1][:200]
    return None


def pages_source() -> str:
    """The C source of migrate.stream._pages, as cffi builds it."""
    sys.path.insert(0, str(ROOT))
    from migrate.stream._build_pages import ffibuilder
    return ffibuilder._assigned_source[1]     # (module name, source, extension, kwargs)


def build(names=NAMES) -> dict[str, Path]:
    cc = clang()
    if cc is None:
        raise SystemExit("fuzz_c: no clang found (Debian: apt-get install clang libclang-rt-14-dev)")
    BUILD.mkdir(parents=True, exist_ok=True)
    (BUILD / "pages_impl.c").write_text(pages_source())
    out = {}
    for name in names:
        target = BUILD / f"{name}_fuzz"
        includes = [f"-I{d}" for d in INCLUDES[name]] + EXTRA.get(name, [])
        objects = []
        for source in UNDER_TEST.get(name, []):
            obj = BUILD / f"{source.stem}.o"
            _compile([cc, *FLAGS, "-fsanitize=fuzzer-no-link", *includes, "-c", str(source), "-o", str(obj)], name)
            objects.append(str(obj))
        harness = [*FLAGS, *includes, str(HARNESSES / f"{name}_fuzz.c")]
        if objects and name not in WHOLE:   # the harness's own checks without coverage
            harness = [f.replace("-fsanitize=fuzzer,", "-fsanitize=") for f in harness]
            harness_obj = BUILD / f"{name}_fuzz.o"
            _compile([cc, *harness, "-c", "-o", str(harness_obj)], name)
            harness = [*FLAGS, str(harness_obj)]
        _compile([cc, *harness, *objects, "-o", str(target), *LIBS.get(name, [])], name)
        out[name] = target
    return out


def _compile(cmd: list[str], name: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"fuzz_c: building {name} failed:\n{' '.join(cmd)}\n{done.stderr}")


def run(name: str, runs: int | None, seconds: int | None, extra: list[str], grow: bool) -> int:
    binary = build([name])[name]
    corpus = CORPORA / name
    corpus.mkdir(parents=True, exist_ok=True)
    scratch = corpus if grow else Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    artifacts = BUILD / "crashes"
    artifacts.mkdir(exist_ok=True)
    args = [str(binary), "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/{name}-", *extra]
    if runs is not None:
        args.append(f"-runs={runs}")
    if seconds is not None:
        args.append(f"-max_total_time={seconds}")
    args += [str(scratch)] + ([] if grow else [str(corpus)])
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    try:
        return subprocess.run(args, env=env).returncode
    finally:
        if not grow:
            shutil.rmtree(scratch, ignore_errors=True)


# The files whose coverage `coverage` reports (the code under test, not the harness)
COVERED = {
    "stub": [ROOT / "migrate" / "stub" / "src" / "stub.c", ROOT / "migrate" / "stub" / "src" / "devstate.h",
             ROOT / "migrate" / "stub" / "src" / "netdev.c"],
    "pages": [BUILD / "pages_impl.c"],
    "runloop": [ROOT / "migrate" / "kvm" / "runloop.c"],
    "placement": [ROOT / "migrate" / "dataplane" / "dataplane.c"],
    "channels": [ROOT / "migrate" / "dataplane" / "dataplane.c"],
}


def coverage(name: str, dirs: list[Path], functions: bool = False) -> str:
    """Line and region coverage of the code under test by the inputs in ``dirs`` (default:
    the corpus kept in the repo), from a build with clang's source-based coverage; with
    ``functions``, function by function."""
    cc = clang()
    if cc is None:
        raise SystemExit("fuzz_c: no clang found")
    version = cc.partition("-")[2]
    tools = [shutil.which(f"{tool}-{version}" if version else tool) or shutil.which(tool)
             for tool in ("llvm-profdata", "llvm-cov")]
    if not all(tools):
        raise SystemExit("fuzz_c: llvm-profdata and llvm-cov are needed (Debian: llvm)")
    build([name])                           # writes pages_impl.c
    out = BUILD / f"{name}_cov"
    flags = ["-g", "-O0", "-fprofile-instr-generate", "-fcoverage-mapping", "-fsanitize=fuzzer"]
    sources = [str(HARNESSES / f"{name}_fuzz.c"), *map(str, UNDER_TEST.get(name, []))]
    _compile([cc, *flags, *[f"-I{d}" for d in INCLUDES[name]], *EXTRA.get(name, []), *sources, "-o", str(out), *LIBS.get(name, [])], name)
    raw, data = BUILD / f"{name}.profraw", BUILD / f"{name}.profdata"
    dirs = dirs or [CORPORA / name]
    subprocess.run([str(out), "-runs=0", *map(str, dirs)], env={**os.environ, "LLVM_PROFILE_FILE": str(raw)},
                   capture_output=True, check=True)
    subprocess.run([tools[0], "merge", "-sparse", str(raw), "-o", str(data)], check=True)
    report = subprocess.run([tools[1], "report", str(out), f"-instr-profile={data}",
                             *(["-show-functions"] if functions else []), *map(str, COVERED[name])],
                            capture_output=True, text=True, check=True)
    return report.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build")
    runner = sub.add_parser("run")
    runner.add_argument("name", choices=NAMES)
    runner.add_argument("--runs", type=int)
    runner.add_argument("--seconds", type=int)
    runner.add_argument("--grow-corpus", action="store_true", help="keep new inputs in the repo corpus")
    cov = sub.add_parser("coverage", help="line/region coverage of the code under test by a corpus")
    cov.add_argument("name", choices=NAMES)
    cov.add_argument("dirs", nargs="*", type=Path, help="input directories (default: the repo corpus)")
    cov.add_argument("--functions", action="store_true", help="per function")
    args, extra = parser.parse_known_args()
    if extra and args.command != "run":     # only run passes arguments on (to libFuzzer)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "coverage":
        print(coverage(args.name, args.dirs, args.functions), end="")
        return 0
    if args.command == "build":
        for name, path in build().items():
            print(f"{name}: {path}")
        return 0
    return run(args.name, args.runs, args.seconds, extra, args.grow_corpus)


if __name__ == "__main__":
    sys.exit(main())
