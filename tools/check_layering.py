#!/usr/bin/env python3
"""Checks that every #include "..." of this repository's headers is declared in BUILD: a header
owned by a cc rule may be included only by that rule's own files or by rules that depend on it
directly (so a private header stays private, and a friend is declared as one). Bazel's gcc
toolchain has no layering check of its own. Dependencies are taken from `bazel cquery` in the
default configuration and with --define=cuda=true --define=fuzz=true (the CUDA and fuzz
targets' select()ed deps), their union per rule. Exit status 1 on a violation.

    python3 tools/check_layering.py
"""
import json
import os
import re
import subprocess
import sys

CONFIGS = ([], ["--define=cuda=true", "--define=fuzz=true"])
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def rules(flags):
    result = subprocess.run(["bazel", "cquery", *flags, "--output=jsonproto",
                             'kind("cc_(library|binary|test)", //...)'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"check_layering.py: bazel cquery failed:\n{result.stderr[-3000:]}")
    found = {}
    for entry in json.loads(result.stdout).get("results", []):
        rule = entry["target"]["rule"]
        attrs = {a["name"]: a.get("stringListValue", []) for a in rule["attribute"]}
        found[rule["name"]] = {k: attrs.get(k, []) for k in ("srcs", "hdrs", "deps")}
    return found


def path(label):  # //core/ops:logit_stats.h -> core/ops/logit_stats.h
    package, _, name = label[2:].partition(":")
    return f"{package}/{name}" if package else name


def files(rule):
    return {path(f) for f in [*rule["srcs"], *rule["hdrs"]] if f.startswith("//")}


def main():
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    merged = {}
    for flags in CONFIGS:
        for name, rule in rules(flags).items():
            into = merged.setdefault(name, {"srcs": set(), "hdrs": set(), "deps": set()})
            for key in into:
                into[key] |= set(rule[key])
    owners = {}
    for name, rule in merged.items():
        for f in files(rule):
            if f.endswith(".h"):
                owners.setdefault(f, set()).add(name)
    violations = []
    for name, rule in sorted(merged.items()):
        allowed = files(rule)
        for dep in rule["deps"]:
            if dep in merged:
                allowed |= files(merged[dep])
        for f in sorted(files(rule)):
            if not os.path.isfile(f):
                continue
            with open(f, errors="replace") as text:
                for header in INCLUDE.findall(text.read()):
                    if header in owners and header not in allowed:
                        violations.append(f"{name}: {f} includes {header} (of "
                                          f"{', '.join(sorted(owners[header]))}) without "
                                          "depending on it")
    for v in violations:
        print(v)
    print(f"check_layering.py: {len(merged)} rules, {len(violations)} undeclared includes")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
