"""The export wing: turn a finished run into files other tools load (``edgetune export``).

It reads what the train wing wrote (the run folder, the base loaded as training saw it), so it may import the
train and plan wings; neither of them imports it.
"""
