# -*- test-case-name: tests.test_contentpolicies,tests.test_mimeparts -*-
"""
What an account may do: authorization of senders and recipients, rate limits
and the failed-login throttle, content policies (R12).
"""
