"""pyattn.kernels: Triton kernels, one subpackage per kernel family.

Shipped inside the wheel as ``pyattn.kernels`` (the ``kernels/`` folder of the source
tree is mapped there by setup.py). Importing this package imports no Triton.
"""
