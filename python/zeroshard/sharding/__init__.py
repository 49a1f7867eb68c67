"""The sharded optimizer's parts for every stage: parameters flattened into FlatGroups and
partitioned, gradients reduced bucket by bucket through a bounded ring of buffers and exposed
as p.grad, the checks a step asks of every rank's gradients, loss scaling, what ranks agree on
at construction, the optimizer's state dicts, stage 3's units, and ZeRO++'s quantized gathers
and reductions and node-local parameter copies.
"""
