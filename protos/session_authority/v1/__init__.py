"""Generated wire contract of the session authority, version 1.

The modules beside this file are written by ``tools/generate_protos.py`` and
committed; do not edit them by hand. ``identity`` is written by hand: it
fixes how a TLS peer's principal is read, which the authority and enforcers
must agree on.
"""
