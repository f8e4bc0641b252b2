"""
twistd wiring: configuration, the assembled service, startup checks, logs
and the control socket.
"""
