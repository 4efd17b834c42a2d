"""The stages of an exchange, one concern each (see :mod:`keyhole_sidecar.proxy.flow`).

They never import each other or the wire: what one needs of another is on the Exchange.
"""
