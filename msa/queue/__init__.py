"""
The durable queue: the spool, delivery status notifications, queue control.
"""
