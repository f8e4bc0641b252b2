# -*- test-case-name: tests.test_server,tests.test_sessions -*-
"""
The submission server: the SMTP protocol a client talks to, its session
state, line framing and DATA filter, address parsing, per-connection limits
and the PROXY header.
"""
