"""ringpipe's version, written once: pyproject.toml reads it from here when it builds.

A process reports the version of the code it actually imported. Installed metadata can say
otherwise: an editable install leaves `ringpipe.egg-info` in the source tree, and
importlib.metadata may find that before (or instead of) the installed dist-info, depending on the
working directory. The ssh host check and the rendezvous compare these strings.
"""
__version__ = "0.1.0"
