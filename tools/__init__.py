"""The operator's command line: ``gmd``, ``gmddirty``, ``gmdclean``.

Talks to running daemons only through the control socket; offline commands use the
public functions of :mod:`gmd.admin`.
"""
