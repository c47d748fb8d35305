"""The opt-in table: which recipient domains accept mail over IPv6, and where it comes from.

``table`` parses and matches the table (pure: text in, ``OptinTable`` out, syntax errors name
the line); ``watch`` keeps it current from its file (reloads on change and on SIGHUP, keeping
the last good table when a new one does not parse).
"""
