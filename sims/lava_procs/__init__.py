"""Custom Lava processes for FTBC networks.

A package of its own because Lava finds a ProcessModel by importing the Process's module and
then executing every ``.py`` file in that folder: keep only Lava process/model files here and
use absolute imports (a failing relative import surfaces only as NoProcessModelFound).
"""
