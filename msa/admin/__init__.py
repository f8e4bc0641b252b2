"""
The operator command line, digipoort-msa-admin.
"""
