#!/usr/bin/env bash
# Install everything the test suite needs and run it: the test command of
# README.rst, and what .ci/run runs.  Arguments, if any, name the test modules
# (default: all of tests/).  Prints "trial: N passed, N failed, N skipped".
set -uo pipefail
cd "$(dirname "$0")"

# Real client programs for the interop tests (curl, swaks with SASL), from
# Debian.  Only as root with apt-get; elsewhere those tests skip (but under
# CI=true a missing program fails them).  Postfix for the self-test's
# smuggling verdicts (a throwaway instance in a temp dir, never the system's);
# libauthen-sasl-cyrus-perl because mail hosts have it and swaks must not
# pick it (tests.test_interop.runSwaks selects Authen::SASL::Perl).  The POP3
# clients (mpop, fetchmail, getmail6, Jakarta Mail, NeoMutt under tmux) for
# the return channel's interop tests.
SYSTEM_PACKAGES="curl swaks haproxy systemd msmtp gsasl sasl2-bin libsasl2-modules libauthen-sasl-perl libnet-ssleay-perl libio-socket-ssl-perl libdigest-hmac-perl default-jdk-headless iproute2 mount redis-server postgresql postfix libauthen-sasl-cyrus-perl prometheus groff-base man-db mpop fetchmail getmail6 libjakarta-mail-java neomutt tmux logrotate dovecot-pop3d dovecot-lmtpd"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! dpkg -s $SYSTEM_PACKAGES >/dev/null 2>&1; then
    echo "run-tests: installing $SYSTEM_PACKAGES"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends $SYSTEM_PACKAGES >/dev/null
  fi
fi

# The project and its test dependencies; the TLS scanner in a venv of its own
# (sslyze pins an older cryptography than the MSA wants).
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt \
  -e '.[test]' --config-settings editable_mode=compat 2>&1 | grep -v '^WARNING: Location' || true
if [ ! -x .venv-scan/bin/sslyze ]; then
  python3 -m venv .venv-scan
  .venv-scan/bin/pip install -q --disable-pip-version-check sslyze 2>&1 \
    | grep -v '^WARNING: Location' || true
fi

# nodemailer for its interop test, from the npm registry, into .node-interop/
# (Node.js and npm come with the machine; Debian's where they do not).
if ! command -v npm >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if command -v npm >/dev/null && [ ! -d .node-interop/node_modules/nodemailer ]; then
  npm install --prefix .node-interop --no-audit --no-fund --silent nodemailer@10 \
    >/dev/null 2>&1 || echo "run-tests: npm install nodemailer failed"
fi

# Style and types first: a regression here fails the run like a failed test.
lint=0
.venv/bin/ruff check -q . || lint=1
.venv/bin/ruff format --check -q . || lint=1
.venv/bin/mypy || lint=1
.venv/bin/lint-imports --no-logo || lint=1
# The alert rules (etc/prometheus): valid, and their unit tests pass
# (promtool: Debian's prometheus; required under CI=true).
if command -v promtool >/dev/null; then
  promtool check rules etc/prometheus/digipoort-msa-rules.yml || lint=1
  (cd etc/prometheus && promtool test rules digipoort-msa-rules.test.yml) || lint=1
elif [ "${CI:-}" = true ]; then
  echo "run-tests: promtool is not installed (Debian package prometheus)"
  lint=1
fi

log=$(mktemp)
# Parallel worker processes (trial -j; each has its own temp directory,
# _trial_temp/0, _trial_temp/1, ...): one more than there are cores (a
# third of the suite's time is waiting on timers, sockets and child
# processes: on 2 cores -j3 took 166 s, -j2 229-263 s, -j4 157 s), at most
# 4 (each test may start daemons, PostgreSQL, Redis, Postfix, a JVM).
# TRIAL_JOBS=1 runs them in one process, in order (to tell an isolation
# problem from a defect).
jobs=${TRIAL_JOBS:-$(($(nproc 2>/dev/null || echo 1) + 1))}
if [ -z "${TRIAL_JOBS:-}" ] && [ "$jobs" -gt 4 ]; then
  jobs=4
fi
.venv/bin/python -m twisted.trial -j"$jobs" --temp-directory=_trial_temp "${@:-tests}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
last=$(grep -E '^(PASSED|FAILED)' "$log" | tail -n 1)
count() { echo "$last" | grep -oE "$1=[0-9]+" | cut -d= -f2 | awk '{s+=$1} END {print s+0}'; }
passed=$(count successes)
failed=$(( $(count failures) + $(count errors) + $(count unexpectedSuccesses) ))
skipped=$(count skips)
# A worker process that dies fails the test it was running (trial -j
# reports it as an error: ProcessTerminated).  No closing line at all, or
# trial failing with none of the tests failed (a worker that could not be
# started or stopped), means trial itself broke: that is a failure.
[ -n "$last" ] || failed=$((failed + 1))
[ "$rc" = 0 ] || [ "$failed" != 0 ] || failed=1
rm -f "$log"
echo "trial: ${passed} passed, ${failed} failed, ${skipped} skipped"
if [ "$lint" != 0 ]; then
  echo "run-tests: ruff, mypy, lint-imports or promtool reported problems (see above)"
  [ "$rc" != 0 ] || rc=1
fi
exit "$rc"
