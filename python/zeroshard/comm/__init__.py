"""How bytes move: collectives between ranks (the communicators over gloo and NCCL, the NCCL
watchdog, the rendezvous and call tags that keep ranks in the same call, the guard against a
peer that went elsewhere), which ranks share a node and the groups built over nodes (topology,
comm groups, the many-machines options), copies between device and host memory (side streams),
and the simulation of their asynchrony on CPU (ZEROSHARD_SIMULATE_ASYNC=1).
"""
