#!/usr/bin/env python3
"""Atomic read-modify-writes per request, from a callgrind profile taken with
--dump-instr=yes (instructions.sh with ATOMICS=1 takes one and calls this).

An instruction count misses them: a lock-prefixed instruction (or an xchg with memory, locked
implicitly) counts as one, but costs some 20 cycles, against one for a plain add. This joins
the binary's locked instructions (objdump) with how often callgrind saw each address run.

Usage: atomics.py CALLGRIND_OUT BINARY REQUESTS [--sites N]
  prints the locked instructions per request, by function, and with --sites the N busiest
  instructions with their inlined source chain (addr2line), to find whose lock each one is.
"""

import collections
import re
import subprocess
import sys


def executions(path, object_name):
    """How often each instruction address of `object_name` ran, and the function it is in."""
    objects, functions = {}, {}
    counts, function_of = collections.Counter(), {}
    current_object = current_function = None
    last, skip_next = 0, False
    for line in open(path, encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        if not line:
            continue
        # Names are given once, at their first use, as `(id) name`; later only `(id)`.
        named = re.match(r"(ob|fn|cfn|cob)=\((\d+)\)\s*(.*)", line)
        if named:
            kind, ident, name = named.groups()
            table = objects if kind in ("ob", "cob") else functions
            if name:
                table[ident] = name
            if kind == "ob":
                current_object = objects.get(ident)
            elif kind == "fn":
                current_function = ident
            continue
        if line.startswith("calls="):
            # The next cost line is the call's inclusive cost, not this instruction's.
            skip_next = True
            continue
        if line[0] not in "0123456789+-*":
            continue
        fields = line.split()
        position = fields[0]
        if position.startswith("0x"):
            address = int(position, 16)
        elif position.startswith("+"):
            address = last + int(position[1:])
        elif position.startswith("-"):
            address = last - int(position[1:])
        elif position == "*":
            address = last
        else:
            address = int(position)
        last = address
        if skip_next:
            skip_next = False
            continue
        if len(fields) >= 3 and current_object and current_object.endswith(object_name):
            counts[address] += int(fields[2])
            function_of[address] = current_function
    return counts, function_of, functions


def locked_instructions(binary):
    """Addresses of the binary's locked instructions, with their text."""
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", binary], capture_output=True, text=True, check=True
    ).stdout
    locked = {}
    for line in listing.splitlines():
        match = re.match(r"\s*([0-9a-f]+):\s+(.*)", line)
        if not match:
            continue
        text = match.group(2)
        if re.search(r"\block\b", text) or re.match(r"xchg\s+\S*\(", text) or re.match(
            r"xchg\s+%\w+,\S*\(", text
        ):
            locked[int(match.group(1), 16)] = text
    return locked


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    path, binary, requests = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sites = int(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[4] == "--sites" else 0
    counts, function_of, functions = executions(path, binary.rsplit("/", 1)[-1])
    locked = locked_instructions(binary)
    # Valgrind loads a position-independent executable at a base of its own: the one that
    # puts the most locked instructions on executed addresses.
    base = max((0, 0x108000, 0x400000), key=lambda b: sum(a + b in counts for a in locked))
    total, by_function = 0, collections.Counter()
    for address in locked:
        ran = counts.get(address + base, 0)
        if ran:
            total += ran
            by_function[functions.get(function_of.get(address + base), "?")[:140]] += ran
    print(f"atomic read-modify-writes per request: {total / requests:.1f}")
    for function, ran in by_function.most_common(25):
        print(f"{ran / requests:7.2f}  {function}")
    if sites:
        print(f"\nbusiest {sites} sites (innermost source first):")
        busiest = sorted(((counts.get(a + base, 0), a) for a in locked), reverse=True)[:sites]
        for ran, address in busiest:
            chain = subprocess.run(
                ["addr2line", "-i", "-e", binary, hex(address)], capture_output=True, text=True
            ).stdout.split()
            sources = " <- ".join(part.rsplit("/", 1)[-1] for part in chain[:6])
            print(f"{ran / requests:7.2f}  {locked[address][:28]:28}  {sources}")


if __name__ == "__main__":
    main()
