"""Training: networks (pretrained and from scratch), losses, recipes, schedules, augmentation,
optimization, checkpoints, devices and the training loop. Imports :mod:`kdpipe.core` and
:mod:`kdpipe.data`.
"""
