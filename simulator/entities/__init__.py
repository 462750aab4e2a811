"""The simulation's things, one module each (as in Vidur's ``entities/``): links, drafts, the broker, targets,
fused workers and the generate queue. They are SimPy processes or plain objects driven by them."""
