"""The daemon: configuration, wiring, commands, logs, privileges and limits.

``config`` (the TOML schema, validated once into a frozen ``Config``) -> ``wiring`` (from a
``Config`` to running listeners and their shared parts) -> ``serve_command`` and
``check_command`` (the ``serve`` and ``check`` commands) behind ``cli`` (argument parsing, exit
status). ``logs`` writes one plain line per event; ``privileges`` drops root after binding;
``limits`` sizes connections and DNS sockets from the open-files limit. This is the only layer
that knows every other package; nothing below imports it.
"""
