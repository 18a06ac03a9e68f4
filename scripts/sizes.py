#!/usr/bin/env python3
"""Code shape: no source file over MAX_FILE lines, no function body over
MAX_FN lines outside tests (docs/ARCHITECTURE.md, "Size and shape").

    scripts/sizes.py [--list N]

Prints what is over and exits 1 if anything is; with --list N, also the N
longest functions. Counts a function from its `fn` line to its closing
brace, matching braces outside strings, characters and comments; a
`#[cfg(test)]` line ends what is counted of a file, and test files
(`tests/`, `tests.rs`) are not counted for functions.
"""
import os
import re
import sys

MAX_FILE = 800
MAX_FN = 80
ROOTS = ["src", "multicast", "repair", "scanner", "tests"]
FN = re.compile(r"\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")


def code_only(line):
    """The line without string and char literals or a trailing comment."""
    out, i, n = [], 0, len(line)
    while i < n:
        c = line[i]
        if line.startswith("//", i):
            break
        if c == '"':
            i += 1
            while i < n and line[i] != '"':
                i += 2 if line[i] == "\\" else 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", line[i:]):
            i += len(re.match(r"'(\\.|[^\\'])'", line[i:]).group(0)) - 1
        else:
            out.append(c)
        i += 1
    return "".join(out)


def functions(lines):
    """(name, first line, length) of each function body."""
    i = 0
    while i < len(lines):
        if re.match(r"\s*#\[cfg\(test\)\]", lines[i]):
            return
        m = FN.match(lines[i])
        if not m:
            i += 1
            continue
        depth, started, j = 0, False, i
        while j < len(lines):
            code = code_only(lines[j])
            for ch in code:
                if ch == "{":
                    depth += 1
                    started = True
                elif ch == "}":
                    depth -= 1
            if started and depth == 0:
                break
            if not started and code.rstrip().endswith(";"):
                break
            j += 1
        if started:
            yield m.group(6), i + 1, j - i + 1
            i = j + 1
        else:
            i += 1


def main():
    listing = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[1] == "--list" else 0
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    over, all_fns = [], []
    for root in ROOTS:
        for dirpath, _, files in os.walk(root):
            if "target" in dirpath.split(os.sep):
                continue
            for f in sorted(files):
                if not f.endswith(".rs"):
                    continue
                path = os.path.join(dirpath, f)
                lines = open(path, encoding="utf-8").read().split("\n")
                if len(lines) - 1 > MAX_FILE:
                    over.append(f"{path}: {len(lines) - 1} lines (file, at most {MAX_FILE})")
                test_file = f == "tests.rs" or "tests" in dirpath.split(os.sep)
                if test_file:
                    continue
                for name, at, length in functions(lines):
                    all_fns.append((length, f"{path}:{at} {name}"))
                    if length > MAX_FN:
                        over.append(f"{path}:{at}: fn {name} is {length} lines (at most {MAX_FN})")
    for length, where in sorted(all_fns, reverse=True)[:listing]:
        print(f"{length:4} {where}")
    for o in over:
        print(o)
    print(f"{len(all_fns)} functions; {len(over)} over the limits")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
