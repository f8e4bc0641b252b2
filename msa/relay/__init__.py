"""
The relay to the Digipoort core MTA: the queue runner, the SMTP client, the
outbox.
"""
