# -*- test-case-name: tests.test_readme -*-
"""
digipoort-msa: the SMTP Message Submission Agent of Digipoort (RFC 6409).

Embedding in an existing Twisted program: build a factory with
L{msa.submission.server.SubmissionFactory} from a cred L{Portal} whose realm yields
L{msa.interfaces.ISubmission} avatars, or a whole service with
L{msa.service.tap.makeService}.
"""

__version__ = "0.1.0"
