"""The plan wing: what the model and the machine are, and which strategy fits (``edgetune plan``).

A pure core sizes every strategy in bytes (``components``, ``calibration``, ``budget``) and decides (``decide``);
thin impure edges read the model's config (``sources``, ``inventory``) and the device (``device``, ``profiles``).
Nothing here imports torch at module level, and nothing here imports the train or export wings.
"""
