"""The peer wire protocol and the links that carry it.

Knows nothing of what a volume means and never imports ``gmd``.
"""
