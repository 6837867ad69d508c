"""npd: the NoPorts daemon (relay side B), also installed as ``sshnpd``.

``handlers`` holds the sans-IO decisions, ``daemon`` the asyncio service on an AtClient, ``cli``
the command line (``python -m noports.daemon``).  See docs/internals.md, ``noports.daemon``.
"""
