"""Generated wire contract of the session authority, version 1.

The modules beside this file are written by ``tools/generate_protos.py`` and
committed; do not edit them by hand.
"""
