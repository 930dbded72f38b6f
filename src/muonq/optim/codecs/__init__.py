"""optim/codecs"""
