"""Stage 3: parameters partitioned too. Units gathered before their forward and backward and
freed after, sharded parameters that behave like tensors (ShardedParameter and its ops), models
built sharded (sharded_init), and whole parameters on demand (full_params).
"""
