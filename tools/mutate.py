"""
A small mutation check (issue 10): change one thing at a time in a module
of the MSA, run that module's own tests with trial, put the file back, and
report which mutants the tests killed and which survived.

Not part of the normal test suite: run it by hand, e.g.::

    .venv/bin/python tools/mutate.py                    # every target
    .venv/bin/python tools/mutate.py msa/queue/spool.py       # one module
    .venv/bin/python tools/mutate.py --sample 40 --seed 1
    .venv/bin/python tools/mutate.py msa/queue/writer.py --mutant 12

Mutations (on the syntax tree; the mutated module is written back with
C{ast.unparse}, so comments and formatting differ, not behaviour):
  - comparison operators flipped (C{<} to C{<=}, C{==} to C{!=}, C{in} to
    C{not in}, ...);
  - integer constants changed by +1 and -1;
  - C{True} and C{False} swapped; C{and} and C{or} swapped; an C{and} or
    C{or} replaced by one of its operands; C{not} removed;
  - the test of an C{if} or C{while} made C{False} (the guard dropped);
  - an expression statement (a call), an assignment to an attribute, a
    C{raise} or a C{return} replaced with C{pass};
  - the value of a C{return} replaced with C{None};
  - C{partition} and C{rpartition} swapped (and C{find}/C{rfind},
    C{index}/C{rindex}, C{split}/C{rsplit});
  - two adjacent call statements swapped (the order of two renames).

A mutant whose tests fail, error or time out is killed; one whose tests
pass survived.  The file is always restored, even on Ctrl-C.
"""

import argparse
import ast
import copy
import os
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Module under test -> the test modules run against each of its mutants.
TARGETS = {
    "msa/submission/framing.py": ["tests.test_framing", "tests.test_mutants"],
    "msa/submission/addresses.py": [
        "tests.test_addresses",
        "tests.test_parameters",
        "tests.test_mutants",
    ],
    "msa/submission/parameters.py": ["tests.test_parameters", "tests.test_addresses"],
    # "authorization": the sender policy, the mailbox table it reads and the
    # header From: check.  tests.test_fromspoofing is left out: its hypothesis
    # runs take about 20 s a mutant on a loaded machine.
    "msa/policy/authorization.py": [
        "tests.test_authorization",
        "tests.test_limits",
        "tests.test_mailboxes",
        "tests.test_headerfrom",
        "tests.test_mutants",
    ],
    "msa/policy/mailboxes.py": [
        "tests.test_mailboxes",
        "tests.test_headerfrom",
        "tests.test_authorization",
    ],
    "msa/policy/headerfrom.py": [
        "tests.test_headerfrom",
        "tests.test_mailboxes",
        "tests.test_mutants.HeaderFromRequiredTests",
    ],
    "msa/queue/spool.py": ["tests.test_spool", "tests.test_mutants"],
    "msa/queue/writer.py": [
        "tests.test_spool",
        "tests.test_mutants",
        # The order of the two renames of a commit (issue 18).
        "tests.test_crash.CommitCrashPointTests",
    ],
    "msa/queue/entry.py": ["tests.test_spool", "tests.test_mutants"],
    "msa/durable.py": ["tests.test_durable", "tests.test_groupcommit"],
    "msa/sasl/digest_md5.py": [
        "tests.test_sasl_digest_md5",
        "tests.test_digest_nonascii",
        "tests.test_mutants",
    ],
    # The audit chain: hashing and linking records, and verifying a log.
    # tests.test_audit's daemon and SIGKILL classes are left out (slow).
    "msa/audit/chain.py": [
        "tests.test_audit.ChainTests",
        "tests.test_audit.VerifyTests",
        "tests.test_audit.RotatedVerifyTests",
        "tests.test_audit.ConfigTests",
        "tests.test_auditverify",
        "tests.test_auditgaps",
        "tests.test_auditthreads",
    ],
    "msa/audit/verify.py": [
        "tests.test_audit.VerifyTests",
        "tests.test_audit.RotatedVerifyTests",
        "tests.test_auditverify",
        "tests.test_auditgaps",
    ],
}

_FLIP = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}

#: Methods that read from the other end when swapped.
_ENDS = {"partition": "rpartition", "find": "rfind", "index": "rindex"}
_ENDS.update({"split": "rsplit"})
_ENDS.update({right: left for left, right in list(_ENDS.items())})


def _docstring(node) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)


def mutations(tree: ast.Module):
    """
    Every mutation of C{tree}, as (path of the node, description, change),
    where change is a function altering a copy of the tree in place.
    """
    found = []

    def walk(node, path):
        for field, value in ast.iter_fields(node):
            if isinstance(value, list):
                for i in range(len(value) - 1):
                    if path and all(
                        isinstance(s, ast.Expr)
                        and isinstance(s.value, ast.Call)
                        and not _docstring(s)
                        for s in value[i : i + 2]
                    ):
                        found.append(
                            (
                                path,
                                value[i].lineno,
                                f"statements at lines {value[i].lineno} and "
                                f"{value[i + 1].lineno} swapped",
                                ("swap", field, i),
                            )
                        )
                for i, child in enumerate(value):
                    if isinstance(child, ast.AST):
                        visit(child, path + ((field, i),))
            elif isinstance(value, ast.AST):
                visit(value, path + ((field, None),))

    def visit(node, path):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _FLIP:
                    new = _FLIP[type(op)]
                    found.append(
                        (
                            path,
                            line,
                            f"{type(op).__name__} -> {new.__name__}",
                            lambda n, i=i, new=new: n.ops.__setitem__(i, new()),
                        )
                    )
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool):
                found.append(
                    (
                        path,
                        line,
                        f"{node.value} -> {not node.value}",
                        lambda n: setattr(n, "value", not n.value),
                    )
                )
            elif isinstance(node.value, int):
                for delta in (1, -1):
                    found.append(
                        (
                            path,
                            line,
                            f"{node.value} -> {node.value + delta}",
                            lambda n, d=delta: setattr(n, "value", n.value + d),
                        )
                    )
        elif isinstance(node, ast.BoolOp):
            for i in range(len(node.values)):
                found.append(
                    (
                        path,
                        line,
                        f"{type(node.op).__name__}: only operand {i + 1} kept",
                        ("keep", i),
                    )
                )
            other = ast.Or if isinstance(node.op, ast.And) else ast.And
            found.append(
                (
                    path,
                    line,
                    f"{type(node.op).__name__} -> {other.__name__}",
                    lambda n, o=other: setattr(n, "op", o()),
                )
            )
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            found.append((path, line, "not removed", "unwrap"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _ENDS
        ):
            found.append(
                (
                    path,
                    line,
                    f"{node.func.attr} -> {_ENDS[node.func.attr]}",
                    lambda n: setattr(n.func, "attr", _ENDS[n.func.attr]),
                )
            )
        if isinstance(node, ast.If | ast.While):
            found.append(
                (
                    path,
                    line,
                    f"{type(node).__name__.lower()} guard dropped (test False)",
                    lambda n: setattr(n, "test", ast.Constant(False)),
                )
            )
        if isinstance(node, ast.Return) and node.value is not None:
            if not (isinstance(node.value, ast.Constant) and node.value.value is None):
                found.append(
                    (
                        path,
                        line,
                        "return value -> None",
                        lambda n: setattr(n, "value", ast.Constant(None)),
                    )
                )
        deletable = (
            isinstance(node, ast.Expr)
            and not _docstring(node)
            or isinstance(node, ast.Raise | ast.Return)
            or isinstance(node, ast.Assign | ast.AugAssign)
            and any(
                isinstance(t, ast.Attribute | ast.Subscript)
                for t in getattr(node, "targets", [getattr(node, "target", None)])
            )
        )
        if deletable and path[-1][1] is not None:
            found.append((path, line, "statement deleted", "delete"))
        walk(node, path)

    walk(tree, ())
    return found


def _resolve(tree, path):
    parent, node = None, tree
    for field, index in path:
        parent = node
        node = getattr(node, field)
        if index is not None:
            node = node[index]
    return parent, node


def apply(tree: ast.Module, path, change) -> str:
    """
    The source of a copy of C{tree} with one mutation applied.
    """
    mutant = copy.deepcopy(tree)
    parent, node = _resolve(mutant, path)
    field, index = path[-1]
    if isinstance(change, tuple) and change[0] == "swap":
        statements = getattr(node, change[1])
        i = change[2]
        statements[i], statements[i + 1] = statements[i + 1], statements[i]
    elif change == "delete":
        getattr(parent, field)[index] = ast.Pass()
    elif change == "unwrap" or isinstance(change, tuple):
        replacement = node.operand if change == "unwrap" else node.values[change[1]]
        if index is None:
            setattr(parent, field, replacement)
        else:
            getattr(parent, field)[index] = replacement
    else:
        change(node)
    ast.fix_missing_locations(mutant)
    return ast.unparse(mutant)


def _testModuleExists(name: str) -> bool:
    """
    Whether C{name} (a test module, or a class or method in one) names a
    module of this tree.
    """
    parts = name.split(".")
    return any(
        os.path.exists(os.path.join(ROOT, *parts[:i]) + ".py")
        for i in range(len(parts), 1, -1)
    )


def runTests(tests: list[str], timeout: float) -> str:
    """
    @return: C{"passed"}, C{"failed"} or C{"timeout"}.
    """
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "twisted.trial", "--exitfirst", *tests],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return "timeout"
    return "passed" if result.returncode == 0 else "failed"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", default=list(TARGETS))
    parser.add_argument("--sample", type=int, help="at most this many per module")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="only list mutants")
    parser.add_argument(
        "--mutant",
        type=int,
        action="append",
        help="only the mutant of this number (as --list shows it); repeatable",
    )
    parser.add_argument(
        "--tests", help="comma-separated test modules instead of TARGETS'"
    )
    args = parser.parse_args(argv)
    summary = []
    for module in args.modules:
        tests = args.tests.split(",") if args.tests else TARGETS[module]
        tests = [t for t in tests if _testModuleExists(t)]
        path = os.path.join(ROOT, module)
        with open(path, encoding="utf-8") as f:
            original = f.read()
        tree = ast.parse(original)
        found = mutations(tree)
        chosen = list(enumerate(found))
        if args.mutant:
            chosen = [c for c in chosen if c[0] in args.mutant]
        if args.sample and len(chosen) > args.sample:
            chosen = sorted(random.Random(args.seed).sample(chosen, args.sample))
        if args.list:
            for number, (_, line, what, _) in chosen:
                print(f"{module}:{line} #{number} {what}")
            continue
        started = time.monotonic()
        if runTests(tests, 600) != "passed":
            print(f"{module}: the tests fail without any mutation", file=sys.stderr)
            return 2
        timeout = max(10.0, 5 * (time.monotonic() - started))
        killed, survived = 0, []
        try:
            for number, (nodePath, line, what, change) in chosen:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(apply(tree, nodePath, change))
                outcome = runTests(tests, timeout)
                if outcome == "passed":
                    survived.append(f"{module}:{line} #{number} {what}")
                else:
                    killed += 1
                print(
                    f"{module}:{line} #{number} {what}: {outcome}",
                    flush=True,
                )
        finally:
            with open(path, "w", encoding="utf-8") as f:
                f.write(original)
        summary.append((module, killed, len(chosen), len(found), survived))
    for module, killed, total, everything, survived in summary:
        sampled = f" (sample of {everything})" if total < everything else ""
        print(f"\n{module}: {killed}/{total} killed{sampled}")
        for s in survived:
            print(f"  survived: {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
