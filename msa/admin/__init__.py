# -*- test-case-name: tests.test_admin -*-
"""
The operator command line, digipoort-msa-admin.
"""
