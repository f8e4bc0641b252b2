"""
The twistd plugin: C{twistd digipoort-msa}.  All the work is in L{msa.service.tap}.
"""

from twisted.application.service import ServiceMaker

digipoortMSA = ServiceMaker(
    "Digipoort MSA",
    "msa.service.tap",
    "Digipoort SMTP Message Submission Agent (RFC 6409)",
    "digipoort-msa",
)
