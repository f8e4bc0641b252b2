# -*- test-case-name: tests.test_spool,tests.test_dsn -*-
"""
The durable queue: the spool, delivery status notifications, queue control.
"""
