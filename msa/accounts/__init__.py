"""
Accounts: the model, the file store, password secrets, the cred checkers and
realm, client certificates.
"""
