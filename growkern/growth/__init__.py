"""The growth library: plan -> kernels -> new state, for any model with an adapter.

No model, data, file or command line lives here (those are growkern/models, growkern/train
and growkern/cli). Modules, in the order the data flows:

  adapter.py     what growkern must know about a model class (a table of parameter axes)
  maps.py        DimMap, Axis, TensorPlan, GrowthPlan: the maps a growth is made of
  strategies.py  how new units are made (exact_copy, perturb, ...); register your own
  mup.py         muP's rules over parameter kinds
  plan.py        plan_growth: the plan for a model and a target width
  checks.py      everything validated before anything changes; the memory check
  apply.py       plan -> WidenGroups -> the kernels (growkern/kernels) -> new tensors
  placement.py   where the tensors live: one process, DDP replicas or FSDP2 shards
  schedule.py    the LR schedule after growth (continue, rewarm, restart; muP LRs)
  probe.py       step-0 preservation on a probe batch (and the package's one KL)
  widen.py       widen_ and its GrowthReport: the steps above, top to bottom
  depth.py       plan_depth: which old block each block of a deeper model comes from
  deepen.py      deepen_: the blocks, their optimizer state and the config, in depth
"""
