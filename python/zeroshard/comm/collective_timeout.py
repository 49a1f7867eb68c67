"""CollectiveTimeout: the one error every way a collective can fail to finish ends in (a peer
rank died, stopped responding, or the timeout passed), whichever backend ran it. Its own module
so that the communicators and the NCCL watchdog both raise it without importing each other."""


class CollectiveTimeout(RuntimeError):
    """A collective did not finish: a peer rank died, stopped responding, or the timeout passed.
    The message names the collective, this rank and the timeout."""
