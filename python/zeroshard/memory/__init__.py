"""Memory and time before and after: the estimator (bytes per rank for any stage and option, and
its command line `python -m zeroshard.estimate`), model shapes for it, the offloaded step's time
model, and what a running optimizer holds and the process measures.
"""
