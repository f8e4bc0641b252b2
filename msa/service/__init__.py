# -*- test-case-name: tests.test_config,tests.test_startupchecks -*-
"""
twistd wiring: configuration, the assembled service, startup checks, logs
and the control socket.
"""
