"""pycoe.layers"""
