"""A real-mail test lab: Knot DNS, network namespaces, Postfix and swaks, driven from Python.

Nothing here is imported by the daemon; the modules start and stop real programs for the
tests (`knot` authoritative DNS, `postfix`, `swaks`, `ip netns`) and always clean up after
themselves, by PID and by name.
"""
