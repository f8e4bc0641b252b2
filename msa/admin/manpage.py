# -*- test-case-name: tests.test_manpages -*-
"""
The manual pages, generated from the programs' own option definitions so
that they cannot drift from them: C{digipoort-msa-admin(1)} from its
argparse parser (every subcommand with its arguments and help), and
C{digipoort-msa(8)} from the twistd plugin's L{msa.service.tap.Options}.

    python -m msa.admin.manpage man/

writes both into C{man/}, from where C{setup.cfg}'s C{data_files} installs
them under C{share/man}; C{tests.test_manpages} checks that the files are
what this module makes, and that C{groff -ww} and C{man --warnings} find
nothing to say about them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

from msa import __version__

__all__ = ["adminPage", "daemonPage", "writePages"]

#: The pages, by file name.
PAGES = ("digipoort-msa-admin.1", "digipoort-msa.8")


def roff(text: str) -> str:
    """
    C{text} as roff body text: backslashes and hyphens escaped, and no line
    starting with a control character.
    """
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def _paragraphs(text: str) -> Iterator[str]:
    """
    The paragraphs of a docstring, L{epytext} markup (C{C{...}}, C{L{...}})
    reduced to its text, each joined into one line.
    """
    import re

    text = re.sub(r"[CLBI]\{([^{}]*)\}", r"\1", text)
    for block in text.strip().split("\n\n"):
        lines = [line.strip() for line in block.splitlines()]
        if lines:
            yield " ".join(lines)


def _header(name: str, section: int, summary: str) -> list[str]:
    return [
        f'.TH {name.upper()} {section} "" "digipoort-msa {__version__}" '
        '"Digipoort MSA"',
        ".SH NAME",
        f"{roff(name)} \\- {roff(summary)}",
    ]


def _option(action: argparse.Action) -> str:
    """
    An option or positional argument as it is written, e.g.
    C{--realm REALM} or C{USER}.
    """
    metavar = action.metavar
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    if not action.option_strings:
        return (metavar or action.dest).upper()
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return names
    return f"{names} {metavar or action.dest.upper()}"


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        action
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
    ]


def _commands(
    parser: argparse.ArgumentParser, prefix: str = ""
) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """
    Every leaf subcommand under C{parser}: (its words, its help, its parser).
    """
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        for name, subparser in action.choices.items():
            words = f"{prefix} {name}".strip()
            nested = list(_commands(subparser, words))
            if nested:
                yield from nested
            else:
                yield words, helps.get(name, ""), subparser


def _usage(words: str, parser: argparse.ArgumentParser) -> str:
    parts = [words]
    for action in _arguments(parser):
        text = _option(action)
        if action.option_strings or action.nargs in ("?", "*"):
            text = f"[{text}]"
        if action.nargs == "*":
            text = f"[{_option(action)}...]"
        parts.append(text)
    return " ".join(parts)


def adminPage() -> str:
    """
    C{digipoort-msa-admin(1)}.
    """
    from msa.admin import command

    parser = command._parser()
    lines = _header(
        "digipoort-msa-admin",
        1,
        "manage the accounts, the mail queue and the audit log of the Digipoort MSA",
    )
    lines += [".SH SYNOPSIS", ".B digipoort-msa-admin"]
    lines.append(roff("[--accounts PATH] [--realm REALM]... [--config PATH]"))
    lines.append(roff("accounts|queue|audit|selftest COMMAND [ARGUMENTS]"))
    lines.append(".SH DESCRIPTION")
    doc = list(_paragraphs(command.__doc__ or ""))
    # The first paragraph is the summary, the second the synopsis above;
    # the exit codes have their own section.
    for paragraph in doc[2:]:
        if not paragraph.startswith("Exit codes"):
            lines += [".PP", roff(paragraph)]
    lines.append(".SH OPTIONS")
    for action in _arguments(parser):
        lines += [".TP", f".B {roff(_option(action))}", roff(action.help or "")]
    lines.append(".SH COMMANDS")
    for words, text, subparser in _commands(parser):
        lines += [".TP", f".B {roff(_usage(words, subparser))}"]
        lines.append(roff(text[:1].upper() + text[1:] + "." if text else ""))
        options = [a for a in _arguments(subparser) if a.option_strings]
        if options:
            lines.append(".RS")
            for action in options:
                lines += [".TP", roff(_option(action))]
                if action.help:
                    helpText = action.help % {"default": action.default}
                    lines.append(roff(helpText))
            lines.append(".RE")
    lines += [
        ".SH EXIT STATUS",
        roff(
            "0 on success; 1 when the command failed (an unknown or existing "
            "account, an unreadable file, a refused password, a queued message "
            "that does not verify, a broken audit chain); 2 for usage errors."
        ),
        ".SH SEE ALSO",
        ".BR digipoort-msa (8)",
    ]
    return "\n".join(lines) + "\n"


def daemonPage() -> str:
    """
    C{digipoort-msa(8)}: C{twistd digipoort-msa} and its options.
    """
    from msa.service import tap

    options = tap.Options
    lines = _header("digipoort-msa", 8, "the Digipoort SMTP Message Submission Agent")
    lines += [
        ".SH SYNOPSIS",
        ".B twistd",
        roff("[TWISTD-OPTIONS] digipoort-msa [--config FILE] [--version]"),
        ".SH DESCRIPTION",
        ".PP",
        roff(options.longdesc or ""),
        ".PP",
        roff(
            "It runs under twistd(1), whose own options (--nodaemon, "
            "--pidfile, --logfile, --logger, --uid, --gid) come before the "
            "plugin's name.  The systemd units in etc/ run it as "
            "twistd --nodaemon --pidfile= digipoort-msa --config "
            "/etc/digipoort-msa/msa.toml."
        ),
        ".SH OPTIONS",
    ]
    for long, short, _default, doc in options.optParameters:
        names = f"-{short}, --{long}" if short else f"--{long}"
        lines += [".TP", f".B {roff(names)} \\fIFILE\\fR", roff(doc or "")]
    lines += [
        ".TP",
        ".B \\-\\-version",
        "Print the version and exit.",
        ".SH SIGNALS",
        ".TP",
        ".B SIGTERM",
        roff(
            "Stop accepting connections, let sessions in progress finish "
            "their message for the grace period, then stop."
        ),
        ".TP",
        ".B SIGHUP",
        roff(
            "Reload the accounts and rotate the audit log (as "
            "digipoort-msa-admin audit rotate; a log without a record is "
            "not rotated).  systemctl reload sends it; the shipped logrotate "
            "file does not."
        ),
        ".SH FILES",
        ".TP",
        roff("/etc/digipoort-msa/msa.toml"),
        roff("The configuration (every key: etc/digipoort-msa.toml)."),
        ".SH SEE ALSO",
        ".BR digipoort-msa-admin (1),",
        ".BR twistd (1)",
    ]
    return "\n".join(lines) + "\n"


def writePages(directory: str) -> list[str]:
    """
    Write both pages into C{directory}.

    @return: their paths.
    """
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, text in zip(PAGES, (adminPage(), daemonPage()), strict=True):
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in writePages(sys.argv[1] if len(sys.argv) > 1 else "man"):
        print(written)
