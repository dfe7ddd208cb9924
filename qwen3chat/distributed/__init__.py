"""One model across several processes and machines, on torch.distributed (gloo on CPUs,
NCCL on GPUs), the processes started by ``torchrun`` with the same command line.

world.py joins the process group and carries the collectives, split.py says which share
of each weight a process holds (``--split``), driver.py lets process 0 run everything a
user sees while the others follow its model calls. The model itself only learns its
shares (the ``shard`` methods of model/): no second copy of it."""
