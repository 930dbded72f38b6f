"""optim/kernels"""
