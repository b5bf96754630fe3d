"""The train wing: load a model the way a strategy trains it, run steps, checkpoint, log (``edgetune train``).

``loop.train`` runs a decided plan; ``step.run_step`` is the one step function that the loop and ``probe`` share.
It may import the plan wing, never the export wing or the faces (``api``, ``cli``).
"""
