# -*- test-case-name: tests.test_accounts,tests.test_filestore,tests.test_checkers -*-
"""
Accounts: the model, the file store, password secrets, the cred checkers and
realm, client certificates.
"""
