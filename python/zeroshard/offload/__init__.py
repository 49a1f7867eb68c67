"""offload="cpu": the fp32 master and optimizer state in host memory, gradients landing there
during backward, the host update (at stage 3 beside the next forward) and the watch on
parameters a script changes between steps.
"""
